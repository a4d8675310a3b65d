"""Every model over every preset: builds (the large ones on the meta device, no memory), and the small
ones train a step in fp32 and under bf16 autocast (sublayer outputs in bf16, residual stream in fp32)."""

import pytest
import torch

import fused_kernels
from transformer import (
    GPT,
    BERTConfig,
    BERTForPreTraining,
    EncoderDecoder,
    EncoderDecoderConfig,
    GPTConfig,
    Multimodal,
    MultimodalConfig,
    ViT,
    ViTConfig,
)

MODELS = {
    GPTConfig: (GPT, lambda c, g: dict(input_ids=(x := torch.randint(0, c.vocab_size, (2, 12), generator=g)),
                                       labels=x)),
    BERTConfig: (BERTForPreTraining, lambda c, g: dict(input_ids=torch.randint(5, c.vocab_size, (2, 12), generator=g),
                                                       labels=torch.randint(5, c.vocab_size, (2, 12), generator=g),
                                                       next_sentence_label=torch.tensor([0, 1]))),
    ViTConfig: (ViT, lambda c, g: dict(pixel_values=torch.rand(2, c.num_channels, c.image_size, c.image_size,
                                                               generator=g), labels=torch.tensor([1, 0]))),
    EncoderDecoderConfig: (EncoderDecoder, lambda c, g: dict(
        input_ids=torch.randint(3, c.vocab_size, (2, 9), generator=g),
        labels=torch.randint(3, c.vocab_size, (2, 7), generator=g))),
    MultimodalConfig: (Multimodal, lambda c, g: dict(
        pixel_values=torch.rand(2, c.num_channels, c.image_size, c.image_size, generator=g),
        input_ids=torch.randint(1, c.vocab_size, (2, 6), generator=g),
        labels={t: torch.randint(0, n, (2,), generator=g) for t, n in c.tasks.items()})),
}
CASES = [(cfg, preset) for cfg in MODELS for preset in cfg.presets]
SMALL = [(cfg, p) for cfg, p in CASES
         if p in ("tiny", "small-char", "char-64", "digits", "digits-words", "sliding-alibi-tiny", "llama-tiny")]


@pytest.mark.parametrize("config_class, preset", CASES, ids=[f"{c.__name__}-{p}" for c, p in CASES])
def test_every_preset_builds(config_class, preset):
    config = config_class.from_preset(preset)
    with torch.device("meta"):
        model = MODELS[config_class][0](config)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert config_class.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("config_class, preset", SMALL, ids=[f"{c.__name__}-{p}" for c, p in SMALL])
def test_small_presets_train_in_fp32_and_under_bf16_autocast(config_class, preset):
    torch.manual_seed(0)
    config = config_class.from_preset(preset, dropout=0.0)
    model = MODELS[config_class][0](config)
    batch = MODELS[config_class][1](config, torch.Generator().manual_seed(0))
    losses = {}
    with fused_kernels.use_backend("torch"):
        for precision in ("fp32", "bf16"):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            losses[precision] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
