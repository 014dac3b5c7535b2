"""V-MoE-style image classifier on Fashion-MNIST: a ViT encoder over 7x7 patches whose
top FFN blocks are top-2 mixtures of experts (Riquelme et al. 2021 put MoE in the last
layers), trained with the router's load-balancing and z losses.

Launch (CPU, tiny):
  python -m modjax.train --config experiments/vmoe_fashion_mnist.py:tiny --workdir workdir/vmoe
Full size (one GPU):
  bash launch/gpu.sh experiments/vmoe_fashion_mnist.py workdir/vmoe_fashion_mnist
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: ``""`` (full) or ``"tiny"`` (CPU)."""
    if arg not in ("", "tiny"):
        raise ValueError(f"config arg must be '' or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, num_devices=0)
    c.data = dict(
        name="fashion_mnist", batch_size=32 if tiny else 256, train_split="train",
        eval_split="test", kwargs={},
    )  # fmt: skip
    c.init_from = ""
    c.model = dict(
        name="encoder",
        config=dict(
            num_classes=-1,  # from the dataset
            input_kind="patches",
            image_size=28,
            patch_size=7 if tiny else 4,
            channels=1,
            pooling="mean",
            d_model=32 if tiny else 256,
            num_layers=2 if tiny else 8,
            num_heads=2 if tiny else 8,
            d_ff=64 if tiny else 1024,
            activation="gelu",
            ffn="moe",
            sparse_placement="top",
            sparse_count=1 if tiny else 2,
            sparse_kwargs=dict(num_experts=4 if tiny else 8, k=2),
            dtype="float32" if tiny else "bfloat16",
        ),
    )
    c.task = dict(
        name="classification", input_key="image", target_key="label", mask_key="",
        context={}, aux_loss_weights={"load_balancing": 0.01, "z_loss": 0.001},
    )  # fmt: skip
    c.optimizer = dict(
        name="adamw", learning_rate=3e-3 if tiny else 1e-3, warmup_steps=20 if tiny else 500,
        decay_steps=-1, end_lr_ratio=0.05, weight_decay=0.01 if tiny else 0.05,
        grad_clip_norm=1.0, router_lr_ratio=1.0, freeze="none", freeze_patterns=(),
    )  # fmt: skip
    c.train = dict(
        num_steps=300 if tiny else 20000, log_every=25 if tiny else 200,
        eval_every=150 if tiny else 2000, eval_steps=8 if tiny else 40,
        checkpoint_every=150 if tiny else 2000, keep_checkpoints=2, async_checkpoint=True,
        on_nonfinite="skip", bias_update_rate=0.0, plots=True,
    )  # fmt: skip
    return c
