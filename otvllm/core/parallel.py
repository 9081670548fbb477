"""Tensor parallelism's processes. Rank 0 is the engine's own process: it schedules, prepares
each step's inputs and samples. Ranks 1..N-1 are worker processes it spawns, each with a
ModelRunner over its slice of the model (layers/parallel.py). The ranks meet in a
torch.distributed process group, gloo on CPU and NCCL on CUDA, through a TCP store on
127.0.0.1.

Rank 0 talks to each worker over a pipe. A start-up call (`load_model`, ...) runs the same
ModelRunner method on every rank. A step sends the forward's small header over the pipes and
its index tensors in one broadcast, then every rank runs the forward (the layers' collectives
keep them in step) and each worker answers with its span record of the step. A worker that
dies, fails or does not answer within OTVLLM_TP_TIMEOUT_S fails the call with an error naming
its rank, and the workers are stopped; a worker whose pipe closes (rank 0 is gone) exits."""

import multiprocessing as mp
import os
import signal
import traceback
import weakref
from dataclasses import replace
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.nn.functional as F

from otvllm.core.model_runner import ModelInputs, ModelRunner, aligned_numel
from otvllm.core.resolved_config import ResolvedConfig
from otvllm.environment import read as read_environment
from otvllm.layers.attention import ForwardContext
from otvllm.layers.parallel import COLLECTIVES
from otvllm.models.spec import ModelSpec
from otvllm.tracing import schema as S
from otvllm.tracing.recording import attributes as A
from otvllm.tracing.recording.cuda import memory_snapshot
from otvllm.tracing.recording.records import SpanRecord, now_ns, restart_rids

STOP_GRACE_S = 5.0   # a stopped worker's time to exit before it is killed

# The start-up calls whose every rank shows in engine.init: the phase span its record joins,
# and what the record says.
_CALL_SPANS = {
    "load_model": (S.MODEL_LOAD, A.model_attrs),
    "allocate_kv_cache": (S.KV_CACHE_ALLOCATE, A.kv_cache_attrs),
    "capture_cuda_graphs": (S.CUDA_GRAPH_CAPTURE, None),
}


class RankFailed(RuntimeError):
    """A tensor-parallel rank died, failed or did not answer in time."""

    error_type = "TensorParallelRankFailed"

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.failed_rank = rank


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the CPU, or the GPU r places after the engine's."""
    where = torch.device(device)
    return device if where.type == "cpu" else f"cuda:{(where.index or 0) + rank}"


def _join_group(config: ResolvedConfig, rank: int, store: dist.Store, timeout_s: float) -> None:
    backend = "nccl" if torch.device(config.device).type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=config.tensor_parallel_size,
                            timeout=timedelta(seconds=timeout_s))


def _rank_record(name: str, rank: int, device: str, start_ns: int, attrs: dict) -> SpanRecord:
    attrs.update({S.TP_RANK: rank, S.TP_DEVICE: device, S.TP_PID: os.getpid()})
    return SpanRecord(S.rank_name(name, rank), None, start_ns, now_ns(), attrs)


def _collective_attrs() -> dict:
    count, ms = COLLECTIVES.take()
    attrs = {S.TP_COLLECTIVES: count}
    if ms is not None:
        attrs[S.TP_COLLECTIVE_MS] = ms
    return attrs


# ---- a step's inputs, from rank 0 to the others ------------------------------------------------

_CTX_TENSORS = ("slot_mapping", "block_tables", "cu_seqlens_q", "cu_seqlens_k", "context_lens", "query_tiles")


def _slot(numel: int) -> int:
    """int64 elements a tensor of `numel` takes in the flat tensor: aligned as on rank 0."""
    return aligned_numel(numel, torch.int64.itemsize)


def _pack(inputs: ModelInputs) -> tuple[tuple, torch.Tensor]:
    """(a picklable header, the index tensors flattened into one int64 tensor on the device)."""
    ctx = inputs.ctx
    tensors = [inputs.input_ids, inputs.positions, inputs.logits_indices, inputs.prompt_rows,
               *(getattr(ctx, n) for n in _CTX_TENSORS)]
    layout = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
    flat = torch.cat([F.pad(t.reshape(-1).to(torch.int64), (0, _slot(t.numel()) - t.numel()))
                      for t in tensors if t is not None])
    return (inputs.phase, ctx.is_prefill, ctx.max_seqlen_q, ctx.max_context_len, layout), flat


def _unpack(header: tuple, flat: torch.Tensor) -> ModelInputs:
    phase, is_prefill, max_seqlen_q, max_context_len, layout = header
    tensors, offset = [], 0
    for entry in layout:
        if entry is None:
            tensors.append(None)
            continue
        shape, dtype = entry
        size = torch.Size(shape).numel()
        tensors.append(flat[offset:offset + size].view(shape).to(dtype))
        offset += _slot(size)
    input_ids, positions, logits_indices, prompt_rows, *ctx_tensors = tensors
    ctx = ForwardContext(is_prefill, **dict(zip(_CTX_TENSORS, ctx_tensors)), max_seqlen_q=max_seqlen_q,
                         max_context_len=max_context_len)
    return ModelInputs(input_ids, positions, ctx, logits_indices, sampling=None, phase=phase, prompt_rows=prompt_rows)


def _flat_size(header: tuple) -> int:
    return sum(_slot(int(torch.Size(entry[0]).numel())) for entry in header[4] if entry is not None)


# ---- rank 0's side ---------------------------------------------------------------------------------

class Workers:
    """Ranks 1..N-1, started and joined in a process group with this process as rank 0."""

    _active: "weakref.ref[Workers] | None" = None   # one process group per process

    def __init__(self, config: ResolvedConfig, spec: ModelSpec):
        active = Workers._active() if Workers._active is not None else None
        if active is not None and active.processes:
            raise ValueError("a tensor-parallel engine is already running in this process: close it first "
                             "(LLM.close()), one process group per process")
        if dist.is_initialized():   # left by an engine that was dropped without closing
            dist.destroy_process_group()
        self.config = config
        if torch.device(config.device).type == "cuda":   # rank 0's GPU, as each worker sets its own
            torch.cuda.set_device(torch.device(rank_device(config.device, 0)))
        self.timeout_s = read_environment("OTVLLM_TP_TIMEOUT_S")
        self.tracing = COLLECTIVES.timed = config.trace_level != "off"
        self.records: list[SpanRecord] = []
        self.failure: RankFailed | None = None
        n = config.tensor_parallel_size
        self.store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=timedelta(seconds=self.timeout_s),
                                   wait_for_workers=False)
        spawn = mp.get_context("spawn")
        self.processes, self.pipes = [], []
        self._stopper = weakref.finalize(self, _stop, self.processes, self.pipes)
        for rank in range(1, n):
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=worker_main, args=(config, spec, rank, self.store.port, theirs),
                                    name=f"otvllm-tp-rank-{rank}", daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        Workers._active = weakref.ref(self)
        try:
            _join_group(config, 0, self.store, self.timeout_s)
        except Exception as e:
            raise self._fail(e, "joining the process group") from e

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def call(self, runner: ModelRunner, method: str, *args) -> list:
        """`runner.<method>(*args)` on every rank (a start-up step): each rank's result, rank 0's first."""
        self._check()
        span, attrs = _CALL_SPANS.get(method, (None, None))
        start = now_ns()
        try:
            self._send(("call", method, args))
            results = [getattr(runner, method)(*args)]
            replies = self._replies(timeout_s=None)   # a large model loads slowly: only deaths end the wait
        except RankFailed:
            raise
        except Exception as e:
            raise self._fail(e, method) from e
        if self.tracing and span is not None:
            own = dict(attrs(runner)) if attrs is not None else {}
            own.update(memory_snapshot(runner.device))
            self.records = [_rank_record(span, 0, self.config.device, start, own)]
            self.records += [record for _, record in replies if record is not None]
        return results + [result for result, _ in replies]

    def forward(self, runner: ModelRunner, inputs: ModelInputs):
        """runner.forward(inputs) on every rank: rank 0's (logits, whether a CUDA graph was replayed)."""
        self._check()
        header, flat = _pack(inputs)
        start = now_ns()
        try:
            self._send(("forward", header))
            COLLECTIVES.run(dist.broadcast, flat, src=0)
            result = runner.forward(inputs)
            replies = self._replies(self.timeout_s)
        except RankFailed:
            raise
        except Exception as e:
            raise self._fail(e, "a step") from e
        except BaseException as e:   # Ctrl-C mid-step: the ranks are out of step for good
            self.failure = RankFailed(0, f"a step was interrupted ({type(e).__name__}) while the ranks ran it: "
                                         f"the workers were stopped, start a new engine")
            self._stopper()
            raise
        if self.tracing:
            attrs = _collective_attrs()
            attrs[S.CUDA_GRAPH] = result[1]
            self.records = [_rank_record(S.FORWARD, 0, self.config.device, start, attrs)]
            self.records += [record for _, record in replies if record is not None]
        else:
            COLLECTIVES.take()
        return result

    def take_records(self) -> list[SpanRecord]:
        """The last call's span records, one per rank (rank 0's first), for the tracer."""
        records, self.records = self.records, []
        return records

    def close(self) -> None:
        """Stop the workers and leave the process group."""
        self._stopper()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:   # a group whose peers died may not tear down cleanly
                pass

    # ---- the pipes ------------------------------------------------------------------------------

    def _send(self, message) -> None:
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                pipe.send(message)
            except OSError as e:
                raise self._fail(e, "sending to it", rank) from e

    def _replies(self, timeout_s: float | None) -> list[tuple]:
        """Each worker's (result, record), in rank order."""
        replies = []
        for rank, (process, pipe) in enumerate(zip(self.processes, self.pipes), start=1):
            ready = wait([pipe, process.sentinel], timeout_s)
            if pipe in ready:
                try:
                    status, *payload = pipe.recv()
                except (EOFError, OSError) as e:
                    raise self._fail(e, "answering", rank) from e
                if status == "error":
                    raise self._failed(rank, f"failed: {payload[0]}")
                replies.append(tuple(payload))
            elif ready:
                raise self._failed(rank, f"died ({_exit_reason(process)})")
            else:
                raise self._failed(rank, f"did not answer within OTVLLM_TP_TIMEOUT_S={self.timeout_s:g} s")
        return replies

    # ---- failures -------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.failure is not None:
            raise RankFailed(self.failure.failed_rank, f"{self.failure} (earlier: the engine cannot run without it)")

    def _failed(self, rank: int, what: str) -> RankFailed:
        process = self.processes[rank - 1]
        self.failure = RankFailed(rank, f"tensor-parallel rank {rank} (pid {process.pid}) {what}")
        self._stopper()
        return self.failure

    def _fail(self, exc: BaseException, during: str, rank: int | None = None) -> RankFailed:
        """The rank to blame for `exc`, raised in rank 0 `during` something: one that died, else
        one that reported an error, else one that has not answered (a collective timed out)."""
        for r, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return self._failed(r, f"died ({_exit_reason(process)}) during {during}")
        for r, pipe in enumerate(self.pipes, start=1):
            try:
                if pipe.poll(0):
                    status, *payload = pipe.recv()
                    if status == "error":
                        return self._failed(r, f"failed during {during}: {payload[0]}")
            except (EOFError, OSError):
                return self._failed(r, f"closed its pipe during {during}")
        blamed = rank or 1
        cause = str(exc).splitlines()[0] if str(exc) else ""
        return self._failed(blamed, f"did not answer within OTVLLM_TP_TIMEOUT_S={self.timeout_s:g} s during "
                                    f"{during} ({type(exc).__name__}: {cause})")


def _exit_reason(process) -> str:
    process.join(1)
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _stop(processes: list, pipes: list) -> None:
    """Ask each worker to stop, then kill those that do not; leaves no process behind."""
    for pipe in pipes:
        try:
            pipe.send(None)
        except OSError:
            pass
    for process in processes:
        process.join(STOP_GRACE_S if process.is_alive() else 0)
        if process.is_alive():
            process.kill()
            process.join()
    for pipe in pipes:
        pipe.close()
    processes.clear()
    pipes.clear()


# ---- a worker's side -------------------------------------------------------------------------------

def worker_main(config: ResolvedConfig, spec: ModelSpec, rank: int, port: int, pipe) -> None:
    """A worker process: join the group, build this rank's runner, then serve rank 0's calls
    until it says stop or its pipe closes."""
    restart_rids()   # its records join rank 0's traces: rids of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C of the process group is rank 0's to handle
    config = replace(config, device=rank_device(config.device, rank))
    try:
        device = torch.device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        timeout_s = read_environment("OTVLLM_TP_TIMEOUT_S")
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False,
                              timeout=timedelta(seconds=timeout_s))
        _join_group(config, rank, store, timeout_s)
        _serve(pipe, ModelRunner(config, spec, rank), rank)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass   # rank 0 is gone
    except BaseException as e:
        try:
            pipe.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)


def _serve(pipe, runner: ModelRunner, rank: int) -> None:
    tracing = COLLECTIVES.timed = runner.config.trace_level != "off"
    device = runner.device
    while True:
        message = pipe.recv()
        if message is None:
            return
        start = now_ns()
        if message[0] == "forward":
            result, attrs = None, _forward(runner, message[1], tracing)
            name = S.FORWARD
        else:
            _, method, args = message
            result = getattr(runner, method)(*args)
            name, attrs_of = _CALL_SPANS.get(method, (None, None))
            attrs = dict(attrs_of(runner)) if attrs_of is not None else {}
        record = None
        if tracing and name is not None:
            attrs.update(memory_snapshot(device))
            record = _rank_record(name, rank, runner.config.device, start, attrs)
        pipe.send(("ok", result, record))


def _forward(runner: ModelRunner, header: tuple, tracing: bool) -> dict:
    """This rank's forward of a step. Traced on CUDA, its GPU time, waited for before the reply
    (so rank 0 waits for the step's forward); untraced, the reply follows the launch."""
    device = runner.device
    flat = torch.empty(_flat_size(header), dtype=torch.int64, device=device)
    timer = None
    if device.type == "cuda" and tracing:
        timer = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        timer[0].record()
    COLLECTIVES.run(dist.broadcast, flat, src=0)
    _, used_graph = runner.forward(_unpack(header, flat))
    attrs = {}
    if timer is not None:
        timer[1].record()
        timer[1].synchronize()
        attrs[S.GPU_TIME_MS] = timer[0].elapsed_time(timer[1])
    attrs.update(_collective_attrs())
    attrs[S.CUDA_GRAPH] = used_graph
    return attrs
