"""The trace schema: every span name and attribute key otvllm emits. This is a public
interface (users search Jaeger with these names, tests assert on them); change it with care.

Shapes are integer arrays, memory is in bytes, durations in milliseconds (`*_ms`)."""

# ---- span names ------------------------------------------------------------------------
ENGINE_INIT = "engine.init"
CONFIG_LOAD = "config.load"            # the model directory's config.json (and transformers' import)
TOKENIZER_LOAD = "tokenizer.load"
MODEL_LOAD = "model.load"
KV_CACHE_ALLOCATE = "kv_cache.allocate"
CUDA_GRAPH_CAPTURE = "cuda_graph.capture"
TP_START = "tensor_parallel.start"    # the worker processes started and joined in a process group
GENERATE = "llm.generate"
REQUESTS = "llm.requests"              # a generate call's request spans, under one (collapsible) span
STEP = "engine.step"                   # a detailed step's span is named "engine.step <phase>" (step_name)
SCHEDULE = "scheduler.schedule"
BLOCK_ALLOCATE = "block_manager.allocate"
PREPARE_INPUTS = "model.prepare_inputs"
FORWARD = "model.forward"
SAMPLE = "sampler.sample"
POSTPROCESS = "scheduler.postprocess"
STEPS = "engine.steps"                 # aggregate of steps not detailed, "engine.steps <phases>" (steps_name)
CLI_RUN = "otvllm.run"                 # the CLI's root span: one trace per run
ENGINE_LOOP = "engine.loop"            # serving: a window of the engine loop, its steps as children
# debug level: one span per part of the forward, in the order it runs
EMBEDDING = "model.embedding"
NORM = "norm.layer"                    # the norms before attention and MLP, and the final one
ATTENTION = "attention.layer"          # q/k/v projection, rotary, KV store, attention, output projection
MLP = "mlp.layer"
LM_HEAD = "model.lm_head"
KERNELS_OTHER = "kernels.other"        # a profiled forward's kernels that have no span of their own
# (a profiled forward's other kernel spans are named after their kernel or operator, e.g. `aten::linear`)

STEP_PHASE_SPANS = (SCHEDULE, PREPARE_INPUTS, FORWARD, SAMPLE, POSTPROCESS)
FORWARD_PART_SPANS = (EMBEDDING, NORM, ATTENTION, MLP, LM_HEAD)   # children of model.forward at debug

# A request's span is named as the GenAI conventions have it, `{gen_ai.operation.name}
# {gen_ai.request.model}` ("text_completion Qwen3-0.6B"); the operation is one of these.
OPERATION_TEXT_COMPLETION = "text_completion"
OPERATION_CHAT = "chat"


def request_name(operation: str, model: str) -> str:
    return f"{operation} {model}"


def is_request(name: str, attrs) -> bool:
    """Whether a span of this name and these attributes is a request's span."""
    return name == request_name(attrs.get(GEN_AI_OPERATION), attrs.get(GEN_AI_REQUEST_MODEL))


# A step's row in Jaeger says its phase, without a click: "engine.step prefill", "engine.step
# decode", "engine.steps decode+drain" (a few names, no indexes in them).
def step_name(phase: str) -> str:
    return f"{STEP} {phase}"


def steps_name(phases: str) -> str:
    return f"{STEPS} {phases}"


def is_step(name: str) -> bool:
    return name.startswith(STEP + " ")


def is_steps(name: str) -> bool:
    return name.startswith(STEPS + " ")


# With tensor parallelism, model.load, kv_cache.allocate, cuda_graph.capture and model.forward
# have one child per rank, "model.forward rank 1": each rank's own part, timed in its process.
def rank_name(name: str, rank: int) -> str:
    return f"{name} rank {rank}"


def is_rank(name: str) -> bool:
    return " rank " in name


# ---- request events --------------------------------------------------------------------
EVENT_SCHEDULED = "scheduled"
EVENT_PREEMPTED = "preempted"
EVENT_FIRST_TOKEN = "first_token"
EVENT_FINISHED = "finished"
EVENT_PREFILL_CHUNK = "prefill_chunk"   # a step computed part of a prompt (chunked prefill); a whole one: none

# ---- OpenTelemetry GenAI semantic conventions (request and llm.generate spans) ------------
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
REQUEST_REPETITION_PENALTY = "otvllm.request.repetition_penalty"   # not in the GenAI conventions
REQUEST_MIN_TOKENS = "otvllm.request.min_tokens"
REQUEST_LOGIT_BIAS_TOKENS = "otvllm.request.logit_bias_tokens"   # how many tokens its logit_bias names
REQUEST_PROMPT_LOGPROBS = "otvllm.request.prompt_logprobs"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"   # a served request's n, where not 1
REQUEST_CHOICE_INDEX = "otvllm.request.choice_index"   # a served request's index among its response's choices
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"        # unique: the HTTP response's id in `serve`
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"   # prompt tokens from the prefix cache
# Content, only when OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT (or OTVLLM_TRACE_CONTENT) opts in:
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"     # JSON: [{"role", "parts": [{"type": "text", "content"}]}]
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"   # JSON: the same, with "finish_reason"
REQUEST_PROMPT_TOKEN_IDS = "otvllm.request.prompt_token_ids"
REQUEST_OUTPUT_TOKEN_IDS = "otvllm.request.output_token_ids"
# ... and when the request asked for `logprobs` N: per generated token, its log-probability, and
# the top N (token ids and log-probabilities, N per generated token, one flat array each)
REQUEST_LOGPROBS = "otvllm.request.logprobs"
REQUEST_TOP_LOGPROBS_N = "otvllm.request.top_logprobs_n"
REQUEST_TOP_TOKEN_IDS = "otvllm.request.top_token_ids"
REQUEST_TOP_LOGPROBS = "otvllm.request.top_logprobs"

# engine.loop (serving)
LOOP_WINDOW = "otvllm.loop.window"               # 0, 1, 2, ... since the server started
LOOP_PREFILL_STEPS = "otvllm.steps.prefill"
LOOP_DECODE_STEPS = "otvllm.steps.decode"

# engine.steps (aggregate)
STEPS_FIRST_INDEX = "otvllm.steps.first_index"
STEPS_LAST_INDEX = "otvllm.steps.last_index"
STEPS_MEAN_SEQS = "otvllm.steps.mean_seqs"
STEPS_PHASE_COUNTS = "otvllm.steps.phases"

# ---- otvllm attributes -------------------------------------------------------------------
PHASE = "otvllm.phase"                           # prefill | decode | mixed (both in one step) | drain
STEP_INDEX = "otvllm.step.index"
STEP_DETAIL_REASON = "otvllm.step.detail_reason"  # first|prefill|preemption|error|eager_fallback|slow|
                                                  # slowest_so_far|last|debug|profile
NUM_SEQS = "otvllm.batch.num_seqs"
NUM_BATCHED_TOKENS = "otvllm.batch.num_batched_tokens"
NUM_PREFILL_TOKENS = "otvllm.batch.num_prefill_tokens"   # of those, in prompt chunks
NUM_DECODE_TOKENS = "otvllm.batch.num_decode_tokens"     # of those, one per decoding sequence
NUM_CACHED_TOKENS = "otvllm.batch.num_cached_tokens"
BATCH_SEQ_IDS = "otvllm.batch.seq_ids"           # a detailed step's requests (their otvllm.seq.id), also as links

# scheduler.schedule
NUM_WAITING = "otvllm.scheduler.waiting"
NUM_RUNNING = "otvllm.scheduler.running"
NUM_PREEMPTED = "otvllm.scheduler.preempted"
PREEMPTED_SEQ_IDS = "otvllm.scheduler.preempted_seq_ids"
TOTAL_PREEMPTIONS = "otvllm.scheduler.total_preemptions"
# why the first waiting request was not admitted: max_num_seqs | max_num_batched_tokens | kv_blocks
WAITING_REASON = "otvllm.scheduler.waiting_reason"
WAITING_BLOCKS_NEEDED = "otvllm.scheduler.waiting_blocks_needed"    # kv_blocks: what it needs (free: blocks.free)
PREEMPTED_FOR = "otvllm.scheduler.preempted_for_seq_ids"            # per preempted request: the one that needed blocks
PREEMPTION_BLOCKS_NEEDED = "otvllm.scheduler.preemption_blocks_needed"
PREEMPTION_BLOCKS_FREE = "otvllm.scheduler.preemption_blocks_free"  # when the first preemption was decided

# block_manager.allocate and kv_cache.allocate
BLOCKS_SEQUENCES = "otvllm.blocks.sequences"
BLOCKS_NEW = "otvllm.blocks.new"
BLOCKS_CACHE_HITS = "otvllm.blocks.prefix_cache_hits"
BLOCKS_FREE = "otvllm.blocks.free"
BLOCKS_USED = "otvllm.blocks.used"
BLOCKS_TOTAL = "otvllm.blocks.total"
BLOCK_SIZE = "otvllm.blocks.block_size"
BLOCKS_FREED = "otvllm.blocks.freed"            # returned to the free list (preemptions; finished requests)
BLOCK_IDS = "otvllm.blocks.ids"                  # debug: a sequence's block table after its allocation
BLOCK_IDS_NEW = "otvllm.blocks.new_ids"          # debug: blocks taken for decodes in this schedule
BLOCK_IDS_FREED = "otvllm.blocks.freed_ids"      # debug
SEQ_ID = "otvllm.seq.id"
KV_CACHE_SHAPE = "otvllm.kv_cache.shape"
KV_CACHE_BYTES = "otvllm.kv_cache.bytes"
KV_CACHE_BLOCK_BYTES = "otvllm.kv_cache.block_bytes"

# model.forward (shapes are attribute keys "otvllm.shape.<tensor>")
SHAPE_PREFIX = "otvllm.shape."
CUDA_GRAPH = "otvllm.forward.cuda_graph"
GPU_TIME_MS = "otvllm.forward.gpu_time_ms"
ATTENTION_BACKEND = "otvllm.attention.backend"
ATTENTION_PATH = "otvllm.attention.path"         # prefill | decode: the kernel (a mixed step's decodes are one-token prefill queries)
LAYER_INDEX = "otvllm.layer.index"
NORM_POSITION = "otvllm.norm.position"           # input | post_attention | final

# profiled steps (OTVLLM_TRACE_PROFILE_STEPS): on model.forward, the profile in figures
PROFILE_DEVICE = "otvllm.profile.device"          # cuda: CUDA kernels; cpu: top-level aten operators
PROFILE_KERNELS = "otvllm.profile.kernels"        # kernels (or operators) in the forward
PROFILE_TIME_MS = "otvllm.profile.time_ms"        # their time, summed
PROFILE_TOP_NAMES = "otvllm.profile.top_names"    # the kernel names with the most time, most first
PROFILE_TOP_TIME_MS = "otvllm.profile.top_time_ms"
PROFILE_TOP_CALLS = "otvllm.profile.top_calls"
# on each kernel span (children of model.forward) and on kernels.other
KERNEL_NAME = "otvllm.kernel.name"                # in full (the span's name is shortened)
KERNEL_DEVICE = "otvllm.kernel.device"
KERNEL_GRID = "otvllm.kernel.grid"                # CUDA: the launch's grid and block
KERNEL_BLOCK = "otvllm.kernel.block"
KERNEL_INPUT_SHAPES = "otvllm.kernel.input_shapes"   # CPU: the operator's input shapes (JSON)
KERNEL_COUNT = "otvllm.kernel.count"              # kernels.other: how many
KERNEL_TIME_MS = "otvllm.kernel.time_ms"          # kernels.other: their time, summed

# engine.step on CUDA: GPU telemetry through NVML, read once per detailed step
GPU_UTILIZATION = "otvllm.gpu.utilization_percent"          # of the last sample period (1/6 s to 1 s)
GPU_MEMORY_UTILIZATION = "otvllm.gpu.memory_utilization_percent"
GPU_SM_CLOCK = "otvllm.gpu.sm_clock_mhz"
GPU_MEMORY_CLOCK = "otvllm.gpu.memory_clock_mhz"
GPU_POWER = "otvllm.gpu.power_w"
GPU_TEMPERATURE = "otvllm.gpu.temperature_c"

# CUDA memory (one stats read per traced step)
MEM_ALLOCATED = "otvllm.cuda.memory.allocated_bytes"
MEM_RESERVED = "otvllm.cuda.memory.reserved_bytes"
MEM_PEAK = "otvllm.cuda.memory.peak_bytes"
MEM_FREE = "otvllm.cuda.memory.free_bytes"
MEM_TOTAL = "otvllm.cuda.memory.total_bytes"

# sampler.sample
SAMPLE_GREEDY = "otvllm.sampling.greedy_seqs"
SAMPLE_TEMPERATURE_MIN = "otvllm.sampling.temperature_min"
SAMPLE_TEMPERATURE_MAX = "otvllm.sampling.temperature_max"
SAMPLE_TOP_K = "otvllm.sampling.uses_top_k"
SAMPLE_TOP_P = "otvllm.sampling.uses_top_p"
SAMPLE_MIN_P = "otvllm.sampling.uses_min_p"
SAMPLE_SEEDED = "otvllm.sampling.seeded_seqs"
SAMPLE_LOGPROBS = "otvllm.sampling.logprobs_seqs"
SAMPLE_PENALIZED = "otvllm.sampling.penalized_seqs"
SAMPLE_BIASED = "otvllm.sampling.biased_seqs"   # rows with a logit_bias, or short of their min_tokens
SAMPLE_PROMPT_LOGPROBS = "otvllm.sampling.prompt_logprob_tokens"   # prompt tokens whose logprobs were computed

# scheduler.postprocess
TOKENS_APPENDED = "otvllm.postprocess.tokens_appended"
FINISHED_SEQS = "otvllm.postprocess.finished"
FINISHED_SEQ_IDS = "otvllm.postprocess.finished_seq_ids"
FINISH_REASONS = "otvllm.postprocess.finish_reasons"

# request
REQUEST_QUEUE_TIME_MS = "otvllm.request.queue_time_ms"
REQUEST_TTFT_MS = "otvllm.request.time_to_first_token_ms"
REQUEST_CACHED_TOKENS = "otvllm.request.cached_tokens"
REQUEST_PREEMPTIONS = "otvllm.request.preemptions"
EVENT_STEP = "otvllm.step.index"
EVENT_REASON = "otvllm.finish_reason"
CHUNK_START = "otvllm.chunk.start"     # prefill_chunk: the position of its first token
CHUNK_TOKENS = "otvllm.chunk.tokens"   # prefill_chunk: tokens computed

# llm.generate
GEN_NUM_REQUESTS = "otvllm.generate.requests"
GEN_PROMPT_TOKENS = "otvllm.generate.prompt_tokens"
GEN_OUTPUT_TOKENS = "otvllm.generate.output_tokens"
GEN_STEPS = "otvllm.generate.steps"
GEN_PREFILL_STEPS = "otvllm.generate.prefill_steps"   # steps with prompt tokens (mixed ones too)
GEN_DECODE_STEPS = "otvllm.generate.decode_steps"
GEN_PREFILL_TIME_MS = "otvllm.generate.prefill_time_ms"
GEN_DECODE_TIME_MS = "otvllm.generate.decode_time_ms"
GEN_THROUGHPUT = "otvllm.generate.output_tokens_per_s"
GEN_PREEMPTIONS = "otvllm.generate.preemptions"
# The prefix cache's figures count first admissions, as vLLM does: a preempted request's
# re-admission (its recomputed prompt and generated tokens) is not counted.
GEN_PREFIX_HIT_RATE = "otvllm.generate.prefix_cache_hit_rate"   # prompt tokens served from the cache, of all
GEN_PREFIX_CACHED_TOKENS = "otvllm.generate.prefix_cache_hit_tokens"
GEN_PREFIX_BLOCK_HIT_RATE = "otvllm.generate.prefix_cache_block_hit_rate"   # hits of full-block lookups
GEN_MEM_START = "otvllm.generate.cuda_memory_start_bytes"
GEN_MEM_END = "otvllm.generate.cuda_memory_end_bytes"
GEN_MEM_PEAK = "otvllm.generate.cuda_memory_peak_bytes"
TRACE_STEPS_DETAILED = "otvllm.trace.steps_detailed"
TRACE_STEPS_AGGREGATED = "otvllm.trace.steps_aggregated"
TRACE_AGGREGATE_SPANS = "otvllm.trace.aggregate_spans"
TRACE_STEPS_OVER_BUDGET = "otvllm.trace.steps_over_budget"
TRACE_SPANS_DROPPED = "otvllm.trace.spans_dropped"      # the hand-off to the exporter was full
# step times over every step of the call (llm.generate) or of a stretch (engine.steps)
STEPS_COUNT = "otvllm.steps.count"
STEP_TIME_MEAN_MS = "otvllm.steps.time_mean_ms"
STEP_TIME_P50_MS = "otvllm.steps.time_p50_ms"
STEP_TIME_P99_MS = "otvllm.steps.time_p99_ms"
STEP_TIME_MAX_MS = "otvllm.steps.time_max_ms"
SLOWEST_STEP_INDEX = "otvllm.steps.slowest_index"
SLOWEST_STEP_DETAILED = "otvllm.steps.slowest_detailed"
TRACE_POLICY = "otvllm.trace.sampling_policy"
TRACE_LEVEL = "otvllm.trace.level"

# tensor parallelism: on each rank's span (rank_name), tensor_parallel.start and a failed span
TP_RANK = "otvllm.tp.rank"
TP_DEVICE = "otvllm.tp.device"
TP_PID = "otvllm.tp.pid"                         # the rank's process
TP_COLLECTIVES = "otvllm.tp.collectives"         # all-reduces, gathers and the input broadcast it ran
TP_COLLECTIVE_MS = "otvllm.tp.collective_ms"     # their time (host time on CPU, CUDA events on CUDA; not
                                                 # inside a replayed CUDA graph)
TP_SIZE = "otvllm.tp.size"                       # tensor_parallel.start: the ranks
TP_WORKER_PIDS = "otvllm.tp.worker_pids"         # tensor_parallel.start: ranks 1..N-1's processes
TP_FAILED_RANK = "otvllm.tp.failed_rank"         # the span of a call that a rank failed

# engine.init / model.load
CONFIG_PREFIX = "otvllm.config."   # + each field of EngineConfig (as asked) and ResolvedConfig (as decided)
MODEL_ARCHITECTURE = "otvllm.model.architecture"
MODEL_LAYERS = "otvllm.model.layers"
MODEL_HIDDEN_SIZE = "otvllm.model.hidden_size"
MODEL_HEADS = "otvllm.model.heads"
MODEL_KV_HEADS = "otvllm.model.kv_heads"
MODEL_HEAD_DIM = "otvllm.model.head_dim"
MODEL_VOCAB_SIZE = "otvllm.model.vocab_size"
MODEL_DTYPE = "otvllm.model.dtype"
MODEL_PARAMETER_BYTES = "otvllm.model.parameter_bytes"
CUDA_GRAPH_BATCH_SIZES = "otvllm.cuda_graph.batch_sizes"          # decode graphs
CUDA_GRAPH_PREFILL_TOKENS = "otvllm.cuda_graph.prefill_tokens"   # prefill (and mixed step) graphs; [] if none
# the projections whose few-token products run the Triton GEMV, chosen by timing at start-up:
# ["self_attn.o_proj: 1,2,4", ...]
CUDA_GRAPH_TRITON_GEMV = "otvllm.cuda_graph.triton_gemv"
# whether the decode step's Triton kernels launch with programmatic dependent launch (ops/pdl.py)
CUDA_GRAPH_PROGRAMMATIC_LAUNCH = "otvllm.cuda_graph.programmatic_launch"
TOKENIZER_CLASS = "otvllm.tokenizer.class"       # "none" for a directory without a tokenizer
TOKENIZER_VOCAB_SIZE = "otvllm.tokenizer.vocab_size"

# errors and interruptions
ERROR_TYPE = "error.type"                        # OpenTelemetry's; a signal's name for an interrupt
ERROR_ADVICE = "otvllm.error.advice"
INTERRUPTED = "otvllm.interrupted"               # ended by the export side: the run died first
