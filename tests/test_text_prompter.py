"""TextPrompter (P_text, Sec. 3.1): CLIP text tokens -> SAM sparse tokens conditioned on F_IS."""

from __future__ import annotations

import torch

from prompt_ris.config import Config
from prompt_ris.models import PromptRIS
from prompt_ris.models.text_prompter import TextPrompter

D_T, C, L, HW = 12, 16, 6, 4  # text width, SAM width, tokens, SAM grid side


def _prompter(seed: int = 0) -> TextPrompter:
    torch.manual_seed(seed)
    return TextPrompter(text_dim=D_T, dim=C, num_blocks=2, num_heads=2).eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(3, L, D_T, generator=gen)  # (B, L, D_t)
    pad = torch.tensor([[False] * 3 + [True] * 3, [False] * 6, [False] * 2 + [True] * 4])
    embed = torch.randn(2, C, HW, HW, generator=gen)  # (I, C, h_s, w_s)
    index = torch.tensor([0, 1, 1])
    pe = torch.randn(1, C, HW, HW, generator=gen)
    return text, pad, embed, index, pe


def test_output_is_raw_sam_width_tokens() -> None:
    prompter = _prompter()
    text, pad, embed, index, pe = _inputs()
    with torch.no_grad():
        out = prompter(text, pad, embed, index, pe)
    assert out.shape == (3, L, C) and torch.isfinite(out).all()
    # No padding token here: positions after [EOS] are left as computed (embed_prompts
    # replaces them), so they differ from one another.
    assert not torch.allclose(out[0, 3], out[0, 4])


def test_padding_tokens_are_not_attended() -> None:
    prompter = _prompter()
    text, pad, embed, index, pe = _inputs()
    other = text.clone()
    other[pad] = torch.randn(int(pad.sum()), D_T)  # change only the padded positions
    with torch.no_grad():
        base, changed = (
            prompter(text, pad, embed, index, pe),
            prompter(other, pad, embed, index, pe),
        )
    torch.testing.assert_close(changed[~pad], base[~pad])
    assert not torch.allclose(changed[pad], base[pad])


def test_each_expression_attends_to_its_own_image() -> None:
    prompter = _prompter()
    text, pad, embed, index, pe = _inputs()
    with torch.no_grad():
        together = prompter(text, pad, embed, index, pe)
        for b, image in enumerate(index.tolist()):
            alone = prompter(
                text[b : b + 1], pad[b : b + 1], embed[image : image + 1],
                torch.zeros(1, dtype=torch.long), pe,
            )  # fmt: skip
            torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-5, atol=1e-6)
        other_image = embed.clone()
        other_image[0] = torch.randn(C, HW, HW)  # only expression 0 looks at image 0
        moved = prompter(text, pad, other_image, index, pe)
        other_pe = prompter(text, pad, embed, index, torch.randn(1, C, HW, HW))  # keys carry it
    assert not torch.allclose(moved[0], together[0], atol=1e-4)
    torch.testing.assert_close(moved[1:], together[1:])
    assert not torch.allclose(other_pe, together, atol=1e-4)


def test_gradients_reach_every_parameter() -> None:
    prompter = _prompter().train()
    text, pad, embed, index, pe = _inputs()
    prompter(text, pad, embed, index, pe).square().sum().backward()
    for name, param in prompter.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_start_from_a_token_then_every_parameter_learns() -> None:
    prompter = _prompter().train()
    token = torch.randn(C)
    prompter.start_from(token)
    text, pad, embed, index, pe = _inputs()
    out = prompter(text, pad, embed, index, pe)
    torch.testing.assert_close(out, token.expand(3, L, C), rtol=0, atol=0)
    target = torch.randn(3, L, C)
    (out - target).square().sum().backward()
    for name, param in prompter.named_parameters():
        moved = float(param.grad.abs().sum()) > 0 if param.grad is not None else False
        assert moved == name.startswith("out_norm."), name  # first step: the last norm only
    torch.optim.SGD(prompter.parameters(), lr=0.1).step()
    prompter.zero_grad()
    (prompter(text, pad, embed, index, pe) - target).square().sum().backward()
    for name, param in prompter.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_model_starts_its_text_prompts_as_sam_padding(tiny_model: PromptRIS) -> None:
    _, pad, _, index, _ = _inputs()
    prompter, sam = tiny_model.text_prompter, tiny_model.sam
    width = prompter.in_proj.in_features
    embed = torch.randn(2, *sam.dense_pe().shape[1:])  # (I, D_S, h_s, w_s)
    with torch.no_grad():
        out = prompter(torch.randn(3, L, width), pad, embed, index, sam.dense_pe())
    torch.testing.assert_close(out, sam.pad_embed.expand(3, L, -1), rtol=0, atol=0)


def test_model_builds_it_at_clip_and_sam_widths(tiny_model: PromptRIS, tiny_cfg: Config) -> None:
    prompter = tiny_model.text_prompter
    assert prompter.in_proj.in_features == tiny_cfg.model.clip.text_width
    assert prompter.in_proj.out_features == tiny_cfg.model.sam.prompt_embed_dim
    assert len(prompter.blocks) == tiny_cfg.model.prompts.text_blocks


def _position_prompter(position: str) -> TextPrompter:
    torch.manual_seed(0)
    return TextPrompter(text_dim=D_T, dim=C, num_blocks=2, num_heads=2, position=position).eval()


def test_the_position_encoding_enters_where_the_config_says() -> None:
    """Shifting the position encoding by one vector everywhere changes every key by the same
    amount, which attention's softmax ignores, and every value, which it reads back: so only a
    prompter with the encoding in its values answers differently."""
    text, pad, embed, index, pe = _inputs()
    shifted = pe + torch.randn(1, C, 1, 1, generator=torch.Generator().manual_seed(3))
    for position, moves in (("keys", False), ("values", True), ("keys+values", True)):
        prompter = _position_prompter(position)
        with torch.no_grad():
            a = prompter(text, pad, embed, index, pe)
            b = prompter(text, pad, embed, index, shifted)
        assert (not torch.allclose(a, b, atol=1e-5)) == moves, position


def test_cross_attention_maps_are_given_on_request() -> None:
    prompter = _prompter()
    text, pad, embed, index, pe = _inputs()
    maps: list[torch.Tensor] = []
    with torch.no_grad():
        out = prompter(text, pad, embed, index, pe, maps)
    assert len(maps) == len(prompter.blocks)
    for m in maps:  # (B, L, hw): where each text token reads its image
        assert m.shape == (3, L, HW * HW)
        torch.testing.assert_close(m.sum(-1), torch.ones(3, L))
    torch.testing.assert_close(out, prompter(text, pad, embed, index, pe).detach())


def test_text_start_and_position_come_from_the_config(tiny_cfg: Config) -> None:
    import copy

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.prompts.text_start, cfg.model.prompts.text_position = "random", "values"
    model = PromptRIS.from_config(cfg)
    assert torch.equal(model.text_prompter.out_norm.weight, torch.ones_like(
        model.text_prompter.out_norm.weight))  # fmt: skip
    block = model.text_prompter.blocks[0]
    assert (block.pos_in_keys, block.pos_in_values) == (False, True)


def test_a_position_or_start_the_config_does_not_know_is_refused() -> None:
    import pytest

    from prompt_ris.config import ConfigError, load_config

    for override in (
        "model.prompts.text_position=queries",
        "model.prompts.text_start=zero",
        "model.prompts.text_keys=conv",
    ):
        with pytest.raises(ConfigError, match="expected one of"):
            load_config(overrides=[override])
    with pytest.raises(ValueError, match="position must be one of"):
        TextPrompter(text_dim=D_T, dim=C, num_blocks=1, num_heads=2, position="queries")
    with pytest.raises(ValueError, match="keys must be one of"):
        TextPrompter(text_dim=D_T, dim=C, num_blocks=1, num_heads=2, keys="conv")


def _keys_prompter(keys: str) -> TextPrompter:
    torch.manual_seed(0)
    return TextPrompter(text_dim=D_T, dim=C, num_blocks=2, num_heads=2, keys=keys).eval()


def test_mlp_keys_start_as_the_linear_keys_and_change_only_where_tokens_look() -> None:
    """``keys="mlp"`` starts as the paper's prompter (the reader's last layer is zero). Once the
    reader moves, the attention maps change."""
    text, pad, embed, index, pe = _inputs()
    linear, mlp = _keys_prompter("linear"), _keys_prompter("mlp")
    mlp.load_state_dict(linear.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(
            mlp(text, pad, embed, index, pe), linear(text, pad, embed, index, pe)
        )
        torch.nn.init.normal_(mlp.key_reader[1].fc2.weight, std=0.5)
        linear_maps: list[torch.Tensor] = []
        mlp_maps: list[torch.Tensor] = []
        linear(text, pad, embed, index, pe, linear_maps)
        mlp(text, pad, embed, index, pe, mlp_maps)
    assert not torch.allclose(linear_maps[0], mlp_maps[0], atol=1e-4)
    assert linear.key_reader is None and isinstance(mlp.key_reader, torch.nn.Sequential)


def test_text_keys_come_from_the_config(tiny_cfg: Config) -> None:
    import copy

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.prompts.text_keys = "mlp"
    model = PromptRIS.from_config(cfg)
    assert model.text_prompter.key_reader is not None
    assert PromptRIS.from_config(tiny_cfg).text_prompter.key_reader is None


def test_key_context_changes_the_keys_only() -> None:
    """With one context token attention's weight is 1 whatever the keys, so the output is the
    value alone: other key tokens change nothing there, and change the output over many."""
    from prompt_ris.models.layers import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(C, 2).eval()
    gen = torch.Generator().manual_seed(4)
    query, context, other = (torch.randn(2, k, C, generator=gen) for k in (3, 5, 5))
    with torch.no_grad():
        one = attn(query, context[:, :1])
        torch.testing.assert_close(attn(query, context[:, :1], key_context=other[:, :1]), one)
        many = attn(query, context)
        torch.testing.assert_close(attn(query, context, key_context=context), many)
        assert not torch.allclose(attn(query, context, key_context=other), many, atol=1e-4)
