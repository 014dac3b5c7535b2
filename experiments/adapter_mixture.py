"""Multi-task mixture of adapters: a residual MLP (per position) whose FFN slots are each is a
mixture of bottleneck adapters routed by task id (one adapter per task, fixed task
routing), trained jointly on the synthetic multi-task rules of ``rule_mixture``
(each task is its own random MLP from inputs to classes, per position).

Launch (CPU, tiny):
  python -m modjax.train --config experiments/adapter_mixture.py:tiny --workdir workdir/moa
Learned routing instead of task routing:
  ... --config.model.config.sparse_kwargs="{'num_modules': 4, 'k': 2, 'strategy': 'top_k'}" \
      --config.task.context="{}" \
      --config.task.aux_loss_weights="{'load_balancing': 0.01, 'z_loss': 0.001}"
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: ``""`` (full) or ``"tiny"`` (CPU)."""
    if arg not in ("", "tiny"):
        raise ValueError(f"config arg must be '' or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    num_tasks = 4 if tiny else 16
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, num_devices=0)
    c.data = dict(
        name="rule_mixture", batch_size=32 if tiny else 256, train_split="train",
        eval_split="test",
        kwargs=dict(kind="classification", num_tasks=num_tasks, seq_len=8 if tiny else 64,
                    input_dim=8 if tiny else 32, output_dim=4 if tiny else 16,
                    granularity="sequence"),
    )  # fmt: skip
    c.model = dict(
        name="mlp",
        config=dict(
            in_features=8 if tiny else 32,
            num_classes=-1,  # from the dataset
            per_token=True,
            d_model=32 if tiny else 256,
            num_layers=2 if tiny else 4,
            d_ff=64 if tiny else 1024,
            ffn="mixture",
            sparse_placement="every",
            sparse_every=1,
            sparse_kwargs=dict(
                num_modules=num_tasks, bottleneck_dim=16 if tiny else 64, k=1, strategy="task"
            ),  # fmt: skip
        ),
    )
    c.task = dict(
        name="classification", input_key="inputs", target_key="targets", mask_key="",
        context={"task_ids": "task_id"}, aux_loss_weights={},
    )  # fmt: skip
    c.optimizer = dict(
        name="adamw", learning_rate=1e-2 if tiny else 3e-3, warmup_steps=10, decay_steps=-1,
        end_lr_ratio=0.1, weight_decay=0.0, grad_clip_norm=1.0, router_lr_ratio=1.0,
        freeze="none", freeze_patterns=(),
    )  # fmt: skip
    c.train = dict(
        num_steps=150 if tiny else 3000, log_every=25 if tiny else 100, eval_every=0,
        eval_steps=4, checkpoint_every=100 if tiny else 1000, keep_checkpoints=2,
        async_checkpoint=True, on_nonfinite="skip", bias_update_rate=0.0, plots=True,
    )  # fmt: skip
    return c
