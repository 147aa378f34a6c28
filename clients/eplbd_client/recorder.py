"""Per-slot token counts, accumulated on the device with no host sync (DESIGN.md step 1)."""

from __future__ import annotations

import torch

__all__ = ["LoadRecorder"]


class LoadRecorder:
    """Accumulator ``acc`` [L, S] int64 on ``device``.

    ``record(layer, counts)`` is one in-place add into a preallocated row view:
    no allocation, no host sync (on an accelerator it is one queued kernel).
    The client drains it at every sync (``drain_into``). On a stream device the
    adds must be queued on the stream that is current when the client's
    ``step()`` runs (its end-of-window event and the wait for a buffer's zeroing
    act on that stream), and never captured in a CUDA graph: the client switches
    the accumulator between three buffers at each sync.
    """

    def __init__(self, num_layers: int, slots_per_rank: int, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.slots_per_rank = slots_per_rank
        self.acc = torch.zeros((num_layers, slots_per_rank), dtype=torch.int64, device=device)
        # Row views made once: indexing acc[layer] per call would build a new view each time.
        self._rows = list(self.acc.unbind(0))
        # record_deferred: the step's (layer, counts), added at flush() with one stack + add.
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._order = tuple(range(num_layers))
        self._stacked = torch.empty((num_layers, slots_per_rank), dtype=torch.int64, device=device)

    def record(self, layer: int, counts: torch.Tensor) -> None:
        """Add ``counts`` [S] (any integer dtype, same device) to layer ``layer``."""
        self._rows[layer].add_(counts)

    def record_deferred(self, layer: int, counts: torch.Tensor) -> None:
        """Like :meth:`record`, but the add happens at :meth:`flush` (the client's next
        ``step()``): this only keeps a reference, and ``flush`` adds every layer's counts
        with one stack and one add instead of L adds (an accelerator runs 2 kernels
        instead of L). ``counts`` must not be modified or reused until then: fresh
        per-layer tensors (a ``bincount`` result) qualify, a buffer the engine rewrites
        for every layer does not."""
        self._pending.append((layer, counts))

    def flush(self) -> None:
        """Add the counts of :meth:`record_deferred` (the client calls this in ``step()``)."""
        pending = self._pending
        if not pending:
            return
        layers, counts = zip(*pending, strict=True)
        if layers == self._order:  # every layer once, in order: the usual forward
            torch.stack(counts, out=self._stacked)
            self.acc.add_(self._stacked)
        else:  # layers skipped, repeated or out of order
            rows = self._rows
            for layer, c in pending:
                rows[layer].add_(c)
        pending.clear()

    def record_all(self, counts: torch.Tensor) -> None:
        """Add ``counts`` [L, S] at once (engines that count all layers together)."""
        self.acc.add_(counts)

    def use_buffers(self, accs: list[torch.Tensor]) -> None:
        """Accumulate into ``accs[i]`` (each [L, S] int64) after :meth:`switch` ``(i)``.

        The client points the recorder straight at the counts part of the
        all-gather's send buffers and alternates between two, so a sync costs
        one ``zero_`` instead of a copy and a ``zero_``. Row views are made
        here, once.
        """
        for a in accs:
            if a.shape != self.acc.shape or a.dtype != torch.int64:
                raise ValueError(
                    f"need int64 {tuple(self.acc.shape)} buffers, got {a.dtype} {tuple(a.shape)}"
                )
        self._bufs = [(a, list(a.unbind(0))) for a in accs]
        self.switch(0)

    def switch(self, i: int) -> None:
        """Accumulate into buffer ``i`` of :meth:`use_buffers` from now on (zeroed by the caller)."""
        self.acc, self._rows = self._bufs[i]

    def drain_into(self, out: torch.Tensor) -> None:
        """Copy the accumulator into ``out`` [L*S] (flat) and zero it; queued, no host sync
        when ``out`` is on the same device."""
        out.copy_(self.acc.view(-1), non_blocking=True)
        self.acc.zero_()
