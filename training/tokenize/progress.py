"""Progress reporting and the run summary of a tokenize job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


class Progress:
    """Live bars (total, one per reader, one per worker) with clips/s and audio hours/s."""

    def __init__(self, enabled: bool, total: int, reader_totals: Sequence[int], workers: int):
        self.enabled = enabled
        self.start = time.monotonic()
        self.bars: Dict[Tuple[str, int], Any] = {}
        self.hours: Dict[Tuple[str, int], float] = {}
        if not enabled:
            return
        from tqdm import tqdm

        def bar(label: str, n: int, pos: int, total_: Optional[int]) -> None:
            self.bars[(label, n)] = tqdm(total=total_, desc=f"{label} {n}" if label != "total" else "total",
                                         unit="clip", position=pos, leave=label == "total", dynamic_ncols=True)
            self.hours[(label, n)] = 0.0

        bar("total", 0, 0, total)
        for r, t in enumerate(reader_totals):
            bar("reader", r, 1 + r, t)
        for w in range(workers):
            bar("worker", w, 1 + len(reader_totals) + w, None)

    def update(self, label: str, n: int, clips: int, seconds: float) -> None:
        if not self.enabled:
            return
        key = (label, n)
        self.hours[key] += seconds / 3600.0
        bar = self.bars[key]
        bar.update(clips)
        elapsed = max(1e-9, time.monotonic() - self.start)
        bar.set_postfix_str(f"{self.hours[key]:.3f} h audio, {self.hours[key] / elapsed:.4f} h/s", refresh=False)

    def close(self) -> None:
        for bar in reversed(list(self.bars.values())):
            bar.close()


@dataclass
class Summary:
    """What one invocation did (and what OUT_DIR holds afterwards)."""

    clips: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    tokens_per_level: List[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    shards_written: List[str] = field(default_factory=list)
    pending_at_start: int = 0
    total_lines: int = 0
    total_failed: int = 0
    complete: bool = False
    saved_local: Optional[str] = None
    uploaded: Optional[str] = None

    def text(self) -> str:
        hours = self.audio_seconds / 3600.0
        speed = hours / (self.wall_seconds / 3600.0) if self.wall_seconds > 0 else 0.0
        tokens = ", ".join(f"level {i + 1}: {n}" for i, n in enumerate(self.tokens_per_level)) or "none"
        lines = [f"clips encoded: {self.clips}   failed: {self.failed}   (rows pending at start: {self.pending_at_start})",
                 f"audio: {hours:.4f} h in {self.wall_seconds:.1f} s wall = {speed:.1f} audio hours per hour",
                 f"tokens per level: {tokens}",
                 f"shards written: {len(self.shards_written)}; OUT_DIR now holds {self.total_lines} lines and "
                 f"{self.total_failed} failed rows ({'job complete' if self.complete else 'job not complete'})"]
        if self.saved_local:
            lines.append(f"saved with save_to_disk: {self.saved_local}")
        if self.uploaded:
            lines.append(f"uploaded to the hub: {self.uploaded}")
        return "\n".join(lines)
