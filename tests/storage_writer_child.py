"""Child process for crash tests: appends synthetic samples one commit per batch, and can SIGKILL
itself at an exact point of the commit protocol (after the Nth array write of the run)."""
from __future__ import annotations

import os
import signal
import sys

from storage_schemas import ArchiveWriter, writer as writer_module
from storage_schemas.synth import synthetic_records

path, n_samples, batch, kill_at_write = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
SPEC = dict(layers=2, hidden=16, samples=n_samples, vision_tokens=6, text_tokens=10, seed=5)

if kill_at_write >= 0:
    real = writer_module._append_along
    calls = {"n": 0}

    def append_then_maybe_die(*args, **kwargs):
        if calls["n"] == kill_at_write:
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
        return real(*args, **kwargs)

    writer_module._append_along = append_then_maybe_die

if os.path.exists(path):
    writer = ArchiveWriter.open_for_append(path)
else:
    writer = ArchiveWriter.create(path, layers=[0, 1, 2], hidden_size=16, dtype="float16", attrs={},
                                  chunk_tokens=8, chunks_per_shard=2)
done = set(writer.committed_sample_ids)
records = [r for r in synthetic_records(**SPEC) if r.sample_id not in done]
for start in range(0, len(records), batch):
    writer.append(records[start:start + batch])
    writer.flush()
    print("committed", writer.committed["samples"], flush=True)
writer.close()
