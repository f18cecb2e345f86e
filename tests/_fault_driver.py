"""A small training run that tests/test_faults.py starts in subprocesses and hurts for real.

It trains a one-layer LSTM language model with ``fit`` for ``--steps`` steps, a
checkpoint every ``--every`` steps, logging every loss to ``<out>/metrics.jsonl``,
and resumes from the newest intact checkpoint under ``<out>/ckpt`` when there is
one. The faults it can be given:

- ``--slow S``: sleep S seconds after each step (a window for the test's SIGTERM);
- ``--kill-in-save K``: SIGKILL itself in the middle of writing the checkpoint of
  step K (after its metadata file is written, before the write is committed);
- ``--fail-at K``: the batch source raises ``OSError`` making the batch of step K;
- ``--die-at K``: process ``--die-rank`` (1; 0 in a run of one process) SIGKILLs itself
  after step K.

``--strict`` refuses a damaged newest checkpoint instead of falling back. With the
``JAXSEQ_*`` settings in the environment it is one process of a multi-process run
(``--heartbeat`` sets the seconds after which a silent process counts as dead).
The exit status is that of ``fit``'s exception: 143 when preempted. At the end it
writes ``<out>/done<process>.json`` with the step it resumed from and the one it
reached.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--kill-in-save", type=int, default=-1)
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--die-at", type=int, default=-1)
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--heartbeat", type=int, default=100)
    import jaxseq as js

    js.training.add_distributed_args(p)
    args = p.parse_args()
    js.training.init_from_args(
        args, initialization_timeout=60, heartbeat_timeout_seconds=args.heartbeat
    )
    import jax

    if args.kill_in_save >= 0:  # a kill inside the write window of one checkpoint
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

        write = jh.JsonCheckpointHandler._save_fn

        async def write_then_die(self, x, directory):
            await write(self, x, directory)
            if x.get("step") == args.kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

        jh.JsonCheckpointHandler._save_fn = write_then_die

    ids = np.random.default_rng(0).integers(0, 9, size=2000).astype(np.int32)
    model = js.models.char_lm(9, num_layers=1, hidden_size=16, embedding_size=6, dropout_rate=0.1)
    batcher = js.data.StreamBatcher(ids, 4, 10)

    def batches(step):
        if step + 1 == args.fail_at:
            raise OSError(f"the data file vanished (step {step + 1})")
        return batcher.at_step(step)

    opt = js.make_optimizer("adam", 1e-2, warmup_steps=2, total_steps=args.steps)
    key = jax.random.key(3)
    state = js.training.init_state(model.init(key), opt, key, model.initial_carry((4,)))
    ckpt = js.Checkpointer(os.path.join(args.out, "ckpt"), keep=3, model_config=model.config())
    start = 0
    if ckpt.latest_step() is not None:
        if jax.process_count() > 1:
            state = js.training.shard_state(state, js.training.make_mesh())
        state, _ = ckpt.restore(state, strict=args.strict)
        start = int(state.step)
    step_fn = js.make_train_step(js.training.lm_loss_fn(model), opt)

    def on_step(step, rec):
        if args.slow:
            time.sleep(args.slow)
        if step == args.die_at and jax.process_index() == args.die_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    _, info = js.fit(
        step_fn, state, batches, num_steps=args.steps, out_dir=args.out, checkpointer=ckpt,
        checkpoint_every=args.every, on_step=on_step, progress=False, plot=False,
    )  # fmt: skip
    done = {"start": start, "steps": info["steps"], "stopped": info["stopped"]}
    with open(os.path.join(args.out, f"done{jax.process_index()}.json"), "w") as f:
        json.dump(done, f)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        # The error's name and message as ONE write to the pipe the tests read: the
        # traceback Python prints next is written piece by piece, and a checkpoint
        # library's thread that dies at exit ("Event loop is closed") can interleave
        # its own traceback with it, splitting the line the tests look for.
        os.write(2, f"\n{type(e).__name__}: {e}\n".encode())
        raise
