"""One process of the two-process data-parallel run of tests/test_distributed.py.

Started twice (process ids 0 and 1) with the JAXSEQ_* settings in the
environment. Both train the same small LSTM language model over a mesh that
spans the two processes, each feeding half the streams:

1. ``fit`` to ``STEPS`` steps with a checkpoint every ``CKPT`` steps (the
   uninterrupted run);
2. a fresh state restored from the checkpoint of step ``CKPT`` by both processes,
   trained again to ``STEPS`` (the resumed run).

Each process writes ``proc<i>.json`` under ``--out``: its share of a batch, its
share of the carry, the losses and parameters of both runs and an evaluation
over the mesh.
The settings below are read by the test too, for its one-process reference.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

VOCAB, STREAMS, CHUNK, HIDDEN, EMBED, DROPOUT = 7, 4, 5, 8, 4, 0.1
STEPS, CKPT, LR, SEED = 6, 3, 1e-2, 0


def token_ids():
    return np.random.default_rng(1).integers(0, VOCAB, size=STREAMS * 3 * CHUNK).astype(np.int32)


def build(js):
    """The model, the batcher and the optimizer (the same in the test's reference)."""
    model = js.models.char_lm(
        VOCAB,
        num_layers=1,
        hidden_size=HIDDEN,
        embedding_size=EMBED,
        dropout_rate=DROPOUT,
        unroll=1,
    )
    batcher = js.data.StreamBatcher(token_ids(), STREAMS, CHUNK)
    opt = js.make_optimizer("adam", LR, max_norm=1.0)
    return model, batcher, opt


def fresh_state(js, jax, model, opt):
    key = jax.random.key(SEED)
    return js.init_state(model.init(key), opt, key, model.initial_carry((STREAMS,)))


def flat(jax, tree):
    return [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(tree)]


def main():
    import jax

    import jaxseq as js

    p = js.training.add_distributed_args(argparse.ArgumentParser())
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started = js.training.init_from_args(args, initialization_timeout=60)
    me, procs = jax.process_index(), jax.process_count()
    rec = {"started": started, "process": me, "processes": procs, "devices": jax.device_count()}

    model, batcher, opt = build(js)
    mesh = js.training.make_mesh()
    rows = js.training.process_slice(mesh, STREAMS)
    rec["rows"] = [rows.start, rows.stop]

    # this process's share of a batch: the global chunk's columns `rows`, fed either way
    chunk = batcher.at_step(1)
    whole = js.training.shard_batch(chunk, mesh)
    mine = js.training.shard_batch(
        jax.tree_util.tree_map(lambda x: x[:, rows], chunk), mesh, local=True
    )
    shard = [np.asarray(s.data) for s in whole.inputs.addressable_shards]
    rec["batch_global_shape"] = list(whole.inputs.shape)
    rec["batch_local"] = np.concatenate(shard, axis=1).tolist()
    rec["batch_local_from_local"] = np.concatenate(
        [np.asarray(s.data) for s in mine.inputs.addressable_shards], axis=1
    ).tolist()
    rec["batch_want"] = chunk.inputs[:, rows].tolist()

    step = js.make_train_step(js.training.lm_loss_fn(model), opt)
    ckpt_dir = os.path.join(args.out, "ckpt")
    ckpt = js.Checkpointer(ckpt_dir, keep=5)
    losses = {}
    state = js.training.shard_state(fresh_state(js, jax, model, opt), mesh)
    state, info = js.fit(
        step, state, batcher, num_steps=STEPS, mesh=mesh, checkpointer=ckpt,
        checkpoint_every=CKPT, out_dir=os.path.join(args.out, "logs"), progress=True,
        on_step=lambda s, r: losses.__setitem__(s, r["loss"]),
    )  # fmt: skip
    carry_h = jax.tree_util.tree_leaves(state.carry)[0]
    rec["carry_global_shape"] = list(carry_h.shape)
    rec["carry_local_shape"] = [list(s.data.shape) for s in carry_h.addressable_shards]
    rec["run_losses"] = [losses[s] for s in sorted(losses)]
    rec["steps"] = info["steps"]
    rec["ckpt_steps"] = ckpt.all_steps()
    # an evaluation over the mesh, as an eval_fn would run it: each process its streams
    rec["val_loss"] = js.evaluate_lm(model, state.params, batcher, mesh=mesh)

    template = js.training.shard_state(fresh_state(js, jax, model, opt), mesh)
    restored, _ = ckpt.restore(template, step=CKPT)
    rec["restored_step"] = int(restored.step)
    # a template left on this process (not placed on the mesh) gets the whole state
    plain, _ = ckpt.restore(fresh_state(js, jax, model, opt), step=CKPT)
    h_global = jax.tree_util.tree_leaves(restored.carry)[0]
    rec["restore_local_template"] = bool(
        all(not isinstance(x, jax.Array) or x.is_fully_addressable
            for x in jax.tree_util.tree_leaves(plain))
        and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
            jax.tree_util.tree_leaves(plain.params), jax.tree_util.tree_leaves(restored.params)))
        and np.array_equal(np.asarray(jax.tree_util.tree_leaves(plain.carry)[0])[rows],
                           np.asarray(h_global.addressable_shards[0].data))
        and int(plain.step) == CKPT
    )  # fmt: skip
    resumed_losses = {}
    restored, _ = js.fit(
        step, restored, batcher, num_steps=STEPS, mesh=mesh, progress=False,
        max_seconds=1e9,  # a time budget: process 0 decides for both when it is spent
        on_step=lambda s, r: resumed_losses.__setitem__(s, r["loss"]),
    )  # fmt: skip
    rec["resumed_losses"] = [resumed_losses[s] for s in sorted(resumed_losses)]
    ckpt.close()
    rec["run_params"] = flat(jax, state.params)
    rec["resumed_params"] = flat(jax, restored.params)
    with open(os.path.join(args.out, f"proc{me}.json"), "w") as f:
        json.dump(rec, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
