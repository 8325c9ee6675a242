"""Metric sinks: JSONL per step, TensorBoard event files (no TF / torch needed), and metric flattening.

  WORKDIR/metrics.jsonl        one JSON object per train step   {"step": 1, "loss": ..., "diff_acc_per_pos": [...]}
  WORKDIR/eval.jsonl           one per evaluation
  WORKDIR/tb/events.out...     scalars (vectors as tag/i), 2-D metrics (per-layer expert usage) as histograms

On resume the JSONL files are cut back to the restored step, so a run killed after its last checkpoint and resumed
has exactly one record per step. TensorBoard gets a SessionLog START at the first step a run writes, on which its reader
drops the older events of that step and later (the steps replayed after a resume); it is flushed at each checkpoint.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np


def to_host(metrics: dict) -> dict:
    """Device metrics -> plain Python (floats, nested lists)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after kill -9
                break
    return rows


def truncate_jsonl(path: str, max_step: int):
    """Keep only records with step <= max_step (atomic rewrite)."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class JsonlWriter:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def write(self, record: dict):
        self.f.write(json.dumps(record) + "\n")

    def close(self):
        self.f.close()


class TensorBoard:
    """Minimal TensorBoard writer on tensorboard's own EventFileWriter and protos; ``start_step``: the step a run
    resumes from (0 when fresh)."""

    def __init__(self, logdir: str, start_step: int = 0):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.compat.proto import event_pb2, summary_pb2
        self._ev, self._sm = event_pb2, summary_pb2
        self.w = EventFileWriter(logdir)
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self.w.add_event(event_pb2.Event(wall_time=time.time(), step=int(start_step) + 1, session_log=start))

    def _add(self, step: int, values: list):
        self.w.add_event(self._ev.Event(wall_time=time.time(), step=int(step), summary=self._sm.Summary(value=values)))

    def scalars(self, step: int, scalars: dict):
        self._add(step, [self._sm.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

    def histogram(self, step: int, tag: str, counts):
        """A histogram whose buckets are the indices of ``counts`` (e.g. expert ids; the last is the skip class)."""
        c = np.asarray(counts, np.float64)
        idx = np.arange(len(c), dtype=np.float64)
        n = c.sum()
        h = self._sm.HistogramProto(min=0.0, max=float(len(c) - 1), num=float(n), sum=float((c * idx).sum()),
                                    sum_squares=float((c * idx * idx).sum()), bucket_limit=list(idx + 0.5),
                                    bucket=list(c))
        self._add(step, [self._sm.Summary.Value(tag=tag, histo=h)])

    def write(self, step: int, metrics: dict, prefix: str = ""):
        """Scalars as scalars, vectors as tag/i scalars, matrices as one histogram per row."""
        scal = {}
        for k, v in metrics.items():
            a = np.asarray(v, np.float64)
            if a.ndim == 0:
                scal[prefix + k] = a
            elif a.ndim == 1:
                scal.update({f"{prefix}{k}/{i}": x for i, x in enumerate(a)})
            elif a.ndim == 2:
                for i, row in enumerate(a):
                    self.histogram(step, f"{prefix}{k}/{i}", row)
        if scal:
            self.scalars(step, scal)

    def flush(self):
        self.w.flush()

    def close(self):
        self.w.flush()
        self.w.close()

