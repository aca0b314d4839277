"""The sequential engine: walk the decoder blocks one at a time, on the device, resumably.

The model stays on the CPU; the inputs of block 0 are caught with the reference GPTQ code's
"Catcher" (a stand-in for block 0 that records its inputs and stops the forward pass), then each
block moves to the device, is visited (statistics, quantization, ...), produces the next block's
inputs, and moves back. With a `partial_dir`, finished blocks' results and the next block's inputs
are written on a `SaveSchedule` (after every block where saving is cheap against a block), so a
killed run resumes after the last saved block.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from quantmill.model.arch import decoder_layers, get_attr, layout_of

Tensors = dict[str, torch.Tensor]
# visit(index, block, inputs, forward) -> (tensors to keep, JSON metadata, next inputs or None)
BlockVisitor = Callable[[int, nn.Module, "BlockInputs", Callable[[], list[torch.Tensor]]], tuple[Tensors, dict[str, Any], list[torch.Tensor] | None]]


@dataclass
class BlockInputs:
    """What one decoder block receives, per calibration batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its inputs, then stops the forward pass."""

    def __init__(self, block: nn.Module, sink: BlockInputs) -> None:
        super().__init__()
        self.block = block
        self.sink = sink
        # Some models read attributes of their first layer (e.g. attention_type); forward them.
        self.attention_type = getattr(block, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.hidden.append(hidden_states)
        self.sink.kwargs.append(kwargs)
        raise _StopForward


def pick_device(requested: str | None = None) -> torch.device:
    """The accelerator when present (or the one asked for), else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _libc() -> Any:
    """glibc through ctypes, or None (not Linux, or a libc without malloc_trim/mallopt)."""
    global _glibc
    if _glibc is None:
        _glibc = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                lib = ctypes.CDLL("libc.so.6")
                if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
                    _glibc = lib
            except OSError:  # not glibc (musl, ...)
                pass
    return _glibc or None


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed chunks below its (adaptive, up to 32 MB) mmap threshold in the heap, so the
    per-Linear temporaries of a walk (float copies, int32 codes, Hessian products) would otherwise
    stay in the process's resident set and add up to hundreds of MB on a 135M model.
    """
    lib = _libc()
    if lib:
        lib.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own adaptive threshold (64-bit)


@contextmanager
def large_frees_returned_to_os(threshold_bytes: int = 1 << 20) -> Iterator[None]:
    """While inside, allocations of >= threshold_bytes get their own mmap, so freeing one unmaps it.

    For a phase that frees many large blocks once: the checkpoint writer releasing the float
    weights one by one (3.5 MB each on demo), which glibc's adaptive threshold (32 MB once a
    large block was freed) would keep in the heap, resident until the end. Measured on demo's
    RTN W4 stage: the writer's peak RSS went from 1405 MB to 1115 MB. Never around a method:
    there every temporary of that size would be a fresh mmap whose pages fault in at first
    touch (demo's RTN W4 clipping search ran 4.4x slower, 331 s against ~8 s for the method).
    On leaving, the threshold is glibc's 32 MB ceiling (mallopt has no getter, and setting it
    ends the adaptive mode): what the adaptive threshold reaches after the first large free.
    """
    lib = _libc()
    if lib:
        lib.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))
    try:
        yield
    finally:
        if lib:
            lib.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD)


_glibc: Any = None


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block0_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int) -> BlockInputs:
    """Run the embeddings on the device and record what block 0 receives for every batch."""
    layout = layout_of(model)
    layers = decoder_layers(model)
    movable = [get_attr(model, p) for p in layout.embeddings]
    if layout.rotary:
        movable.append(get_attr(model, layout.rotary))
    for m in movable:
        m.to(device)
    sink = BlockInputs([], [])
    first = layers[0]
    layers[0] = _Catcher(first, sink)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
        for m in movable:
            m.to("cpu")
    return sink


def block_forward(block: nn.Module, inputs: BlockInputs, replace: bool = False) -> list[torch.Tensor]:
    """One block over every batch; returns the outputs (the next block's hidden inputs).

    With `replace`, each batch's output takes its input's place in `inputs.hidden` as soon as it
    is computed, so the walk holds one copy of the activations plus one batch, not two copies.
    """
    outs = inputs.hidden if replace else []
    with torch.no_grad():
        for i in range(len(inputs.hidden)):
            out = block(inputs.hidden[i], **inputs.kwargs[i])
            out = out[0] if isinstance(out, tuple) else out
            if replace:
                outs[i] = out
            else:
                outs.append(out)
    return outs


class SaveSchedule:
    """When the walk writes its partial folder: after the first block, then whenever the work done
    since the last save is at least (1 - share) / share times what that save took.

    Saving means writing the next block's inputs, the size of all calibration activations: 75 MB
    on demo at 64 x 512, 4.3 GB for a Llama-3-8B shape at 128 x 2048 in float32, where a block of
    GPTQ on a GPU takes seconds. Saving after every block would then double the walk; this keeps
    the time spent saving near `share` of the walk (10%) and the work a kill can lose to about
    (1 - share) / share saves' worth. Where a save costs little against a block (every CPU run
    measured here, demo included) it still saves after every block.
    """

    def __init__(self, share: float = 0.1, clock: Callable[[], float] = time.perf_counter) -> None:
        self.ratio = (1.0 - share) / share
        self.clock = clock
        self.last_end: float | None = None
        self.last_cost = 0.0

    def due(self) -> bool:
        return self.last_end is None or self.clock() - self.last_end >= self.ratio * self.last_cost

    def saved(self, started: float) -> None:
        self.last_end = self.clock()
        self.last_cost = self.last_end - started


def _save_partial(partial: Path, blocks: list[tuple[int, Tensors, dict[str, Any]]], hidden: list[torch.Tensor]) -> None:
    """Block results first, next inputs second, progress marker last: a kill at any point is safe."""
    partial.mkdir(parents=True, exist_ok=True)
    for index, tensors, meta in blocks:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, partial / f"block-{index:04d}.safetensors")
        (partial / f"block-{index:04d}.json").write_text(json.dumps(meta))
    index = blocks[-1][0]
    save_file({f"h{i}": h.contiguous().cpu() for i, h in enumerate(hidden)}, partial / "hidden.tmp.safetensors")
    (partial / "hidden.tmp.safetensors").replace(partial / "hidden.safetensors")
    (partial / "progress.tmp.json").write_text(json.dumps({"done": index}))
    (partial / "progress.tmp.json").replace(partial / "progress.json")


def _load_progress(partial: Path | None) -> int:
    if partial is None or not (partial / "progress.json").is_file():
        return -1
    return int(json.loads((partial / "progress.json").read_text())["done"])


def finished_blocks(partial: Path | None) -> dict[int, dict[str, Any]]:
    """The metadata of the blocks a killed run finished (what a resume will not walk again)."""
    done = _load_progress(partial)
    return {i: json.loads((partial / f"block-{i:04d}.json").read_text()) for i in range(done + 1)}


def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    visit: BlockVisitor,
    *,
    device: torch.device,
    batch_size: int = 8,
    partial_dir: Path | None = None,
    restore: Callable[[int, nn.Module, Tensors, dict[str, Any]], None] | None = None,
    desc: str = "blocks",
    on_block_done: Callable[[int, int, dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    schedule: SaveSchedule | None = None,
) -> list[tuple[Tensors, dict[str, Any]]]:
    """Visit every decoder block in order and return each block's (tensors, metadata).

    `restore(i, block, tensors, meta)` re-applies a finished block's result when resuming (a
    quantizer writes its weights back); `stop_after` ends the walk after that block (saved), as a
    kill right after its save would. Each visited block's metadata gains `seconds`, its wall time
    (visit and forward pass). With `partial_dir`, blocks are saved on `schedule` (SaveSchedule()).
    """
    model.eval()
    layers = decoder_layers(model)
    inputs = capture_block0_inputs(model, input_ids, device, batch_size)
    done = _load_progress(partial_dir)
    results: list[tuple[Tensors, dict[str, Any]]] = []
    for i in range(done + 1):
        tensors = load_file(partial_dir / f"block-{i:04d}.safetensors")
        meta = json.loads((partial_dir / f"block-{i:04d}.json").read_text())
        if restore is not None:
            restore(i, layers[i], tensors, meta)
        results.append((tensors, meta))
    if done >= 0:
        saved = load_file(partial_dir / "hidden.safetensors", device=str(device))
        inputs.hidden = [saved.pop(f"h{i}") for i in range(len(saved))]  # the list is the only owner
    schedule = schedule or SaveSchedule()
    unsaved: list[tuple[int, Tensors, dict[str, Any]]] = []
    bar = tqdm(total=len(layers), initial=done + 1, desc=desc, unit="block", leave=False)
    for index in range(done + 1, len(layers)):
        start = time.perf_counter()
        block = layers[index].to(device)
        tensors, meta, outputs = visit(index, block, inputs, lambda: block_forward(block, inputs))
        if outputs is None:  # the visit is done with this block's inputs: outputs replace them
            outputs = block_forward(block, inputs, replace=True)
        layers[index] = block.to("cpu")
        inputs.hidden = outputs
        meta["seconds"] = time.perf_counter() - start  # wall time of this block (visit + forward)
        release_host_memory()
        last = index == len(layers) - 1  # saved, so a kill while the stage writes its result loses no block
        if partial_dir is not None:
            unsaved.append((index, tensors, meta))
            if schedule.due() or index == stop_after or last:
                started = time.perf_counter()
                _save_partial(partial_dir, unsaved, outputs)
                schedule.saved(started)
                unsaved = []
        results.append((tensors, meta))
        bar.update(1)
        if on_block_done is not None:
            on_block_done(index, len(layers), meta)
        if stop_after is not None and index >= stop_after:
            break
    bar.close()
    release_host_memory()
    return results
