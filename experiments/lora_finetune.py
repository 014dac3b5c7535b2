"""LoRA fine-tune through surgery: rank-8 LoRAs on every attention query and value
projection of a character Transformer LM, base weights frozen (``optimizer.freeze=base``:
only ``ModuleParam`` and router parameters train, the frozen base has no optimizer
state and no gradient computation). The base is pretrained on all fortunes; the
fine-tune adapts it to one category ("science").

Launch (CPU, tiny): pretrain the base, then fine-tune from its exported parameters:
  python -m modjax.train --config experiments/lora_finetune.py:tiny,pretrain \
      --workdir workdir/lora_base
  python -m modjax.train --config experiments/lora_finetune.py:tiny --workdir workdir/lora \
      --config.init_from=workdir/lora_base/params.npz
(without ``init_from`` the LoRAs adapt a randomly initialised base.)
Full size (one GPU): the same two commands through ``bash launch/gpu.sh CONFIG WORKDIR``
with ``experiments/lora_finetune.py:pretrain`` and ``experiments/lora_finetune.py``.
Other targets: ``--config.surgery.lora_q.pattern='blocks/*/ffn'`` (any glob of module
paths, see modjax.surgery).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: comma-separated ``tiny`` (CPU size) and ``pretrain`` (train the base on
    all categories, no LoRA)."""
    flags = set(filter(None, arg.split(",")))
    if not flags <= {"tiny", "pretrain"}:
        raise ValueError(f"config arg must combine 'tiny' and 'pretrain', got {arg!r}")
    tiny, pretrain = "tiny" in flags, "pretrain" in flags
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, num_devices=0)
    c.data = dict(
        name="char_lm", batch_size=16 if tiny else 64, train_split="train", eval_split="test",
        kwargs=dict(seq_len=64 if tiny else 256, categories=None if pretrain else ("science",)),
    )  # fmt: skip
    c.init_from = ""  # params.npz of the pretraining run
    c.model = dict(
        name="transformer_lm",
        config=dict(
            vocab_size=-1,
            d_model=64 if tiny else 384,
            num_layers=2 if tiny else 6,
            num_heads=4 if tiny else 6,
            d_ff=128 if tiny else 1024,
            ffn="dense",
            dtype="float32" if tiny else "bfloat16",
        ),
    )
    rank = 4 if tiny else 8
    c.surgery = (
        {}
        if pretrain
        else dict(
            lora_q=dict(op="add_lora", pattern="blocks/*/attention/query", rank=rank),
            lora_v=dict(op="add_lora", pattern="blocks/*/attention/value", rank=rank),
        )
    )
    c.task = dict(
        name="lm", input_key="inputs", target_key="targets", mask_key="", context={},
        aux_loss_weights={},
    )  # fmt: skip
    c.optimizer = dict(
        name="adamw", learning_rate=1e-2 if tiny else 2e-3, warmup_steps=10, decay_steps=-1,
        end_lr_ratio=0.1, weight_decay=0.0, grad_clip_norm=1.0, router_lr_ratio=1.0,
        freeze="none" if pretrain else "base", freeze_patterns=(),
    )  # fmt: skip
    c.train = dict(
        num_steps=(200 if pretrain else 100) if tiny else (10000 if pretrain else 2000),
        log_every=10 if tiny else 100,
        eval_every=0, eval_steps=4, checkpoint_every=50 if tiny else 500, keep_checkpoints=2,
        async_checkpoint=True, on_nonfinite="skip", bias_update_rate=0.0, plots=True,
    )  # fmt: skip
    return c
