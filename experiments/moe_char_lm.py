"""Small MoE character language model: the quickstart.

A decoder-only Transformer whose every other FFN is a top-2 mixture of 8 experts,
trained on characters (the fortunes corpus) with the router's load-balancing loss.

Launch (CPU, under 3 minutes on 2 cores):
  python -m modjax.train --config experiments/moe_char_lm.py:tiny --workdir workdir/quickstart
Full size (one GPU):
  bash launch/gpu.sh experiments/moe_char_lm.py workdir/moe_char_lm
Override anything: ``--config.optimizer.learning_rate=1e-3 --config.train.num_steps=500``.
Aux-loss-free balancing (router bias moved outside the optimizer, no balancing loss):
  ... --config.model.config.sparse_kwargs="{'num_experts': 4, 'k': 2, 'aux_loss_free': True}" \
      --config.train.bias_update_rate=0.001 \
      --config.task.aux_loss_weights="{'load_balancing': 0.0, 'z_loss': 0.001}"
Expert parallelism over 8 devices: ``--config.mesh.data=2 --config.mesh.expert=4``.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: ``""`` (full) or ``"tiny"`` (CPU quickstart)."""
    if arg not in ("", "tiny"):
        raise ValueError(f"config arg must be '' or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, num_devices=0)
    seq_len = 64 if tiny else 256
    c.data = dict(
        name="char_lm",
        batch_size=16 if tiny else 64,
        train_split="train",
        eval_split="test",
        kwargs=dict(seq_len=seq_len),
    )
    c.model = dict(
        name="transformer_lm",
        config=dict(
            vocab_size=-1,  # from the dataset
            d_model=64 if tiny else 384,
            num_layers=2 if tiny else 6,
            num_heads=4 if tiny else 6,
            d_ff=128 if tiny else 1024,
            ffn="moe",
            sparse_placement="every",
            sparse_every=2 if not tiny else 1,
            sparse_kwargs=dict(num_experts=4 if tiny else 8, k=2),
            tie_embeddings=True,
            dtype="float32" if tiny else "bfloat16",
            attention_impl="auto",  # cuDNN flash attention on GPU where it applies
            remat="none",  # "dots" / "full": recompute activations, save memory
        ),
    )
    c.task = dict(
        name="lm", input_key="inputs", target_key="targets", mask_key="", context={},
        aux_loss_weights={"load_balancing": 0.01, "z_loss": 0.001},
    )  # fmt: skip
    c.optimizer = dict(
        name="adamw",
        learning_rate=3e-3 if tiny else 1e-3,
        warmup_steps=20 if tiny else 200,
        decay_steps=-1,  # to the end of the run
        end_lr_ratio=0.1,
        weight_decay=0.01,
        grad_clip_norm=1.0,
        router_lr_ratio=1.0,
        freeze="none",
        freeze_patterns=(),
    )
    c.train = dict(
        num_steps=500 if tiny else 5000,
        log_every=25 if tiny else 100,
        eval_every=250 if tiny else 1000,
        eval_steps=4 if tiny else 20,
        checkpoint_every=250 if tiny else 1000,
        keep_checkpoints=3,
        async_checkpoint=True,
        on_nonfinite="skip",
        bias_update_rate=0.0,
        plots=True,
    )
    return c
