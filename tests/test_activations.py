import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lcd.activations import (
    capture_residual,
    find_decoder_layers,
    last_token_positions,
    patch_residual,
)


def tiny_models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=3, n_head=2))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )
    small = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=32)  # fmt: skip
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**small))
    gemma3 = Gemma3ForCausalLM(Gemma3TextConfig(**small, sliding_window=4))
    return {"gpt2": gpt2.eval(), "llama": llama.eval(), "gemma2": gemma2.eval(), "gemma3": gemma3.eval()}


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "gemma3"])
def test_capture_equals_hidden_states(name):
    model = tiny_models()[name]
    ids = torch.randint(0, 50, (2, 7))
    pos = torch.tensor([3, 6])
    with capture_residual(model, layers=None, positions=pos) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, block 0, ..., final norm(last block)
    rows = torch.arange(2)
    for layer in range(2):
        torch.testing.assert_close(cap[layer], hs[layer + 1][rows, pos])  # block i is hidden_states[i + 1]
    # The last entry of hidden_states has the final norm applied; the capture is the raw block output.
    final_norm = model.transformer.ln_f if name == "gpt2" else model.model.norm  # test-side only
    torch.testing.assert_close(final_norm(cap[2]), hs[3][rows, pos])
    assert not torch.allclose(cap[2], hs[3][rows, pos])


def test_hooks_are_removed_even_when_forward_raises():
    model = tiny_models()["gpt2"]
    blocks = find_decoder_layers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_residual(model, layers=[0, 2]):
            model(input_ids=torch.randint(0, 50, (1, 4)))
            raise RuntimeError("boom")
    with pytest.raises(IndexError):
        with patch_residual(model, 1, torch.tensor([0]), torch.zeros(16)):
            model(input_ids=torch.full((1, 4), 999))  # token id out of the vocabulary: fails inside forward
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def test_stop_after_last_skips_later_blocks():
    model = tiny_models()["llama"]
    calls = []
    handle = find_decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    with capture_residual(model, layers=[1], stop_after_last=True) as cap:
        model(input_ids=torch.randint(0, 50, (2, 5)))
    handle.remove()
    assert cap.stopped_early and calls == [] and cap[1].shape == (2, 5, 16)


def test_last_token_positions_under_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_positions(left).tolist() == [3, 3, 3]
    assert last_token_positions(right).tolist() == [1, 3, 0]


def test_capture_reads_the_right_token_under_left_padding():
    model = tiny_models()["llama"]
    ids = torch.randint(1, 50, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    with capture_residual(model, [1], last_token_positions(torch.ones(1, 5))) as a:
        model(input_ids=ids)
    with capture_residual(model, [1], last_token_positions(mask)) as b:
        model(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-4)


def test_patch_changes_only_the_chosen_position_and_layer():
    model = tiny_models()["llama"]
    ids = torch.randint(0, 50, (2, 6))
    with capture_residual(model, [0, 1, 2]) as before:
        model(input_ids=ids)
    value = torch.full((16,), 3.0)
    with capture_residual(model, [0, 1, 2]) as after, patch_residual(model, 1, torch.tensor([2, 4]), value):
        model(input_ids=ids)
    torch.testing.assert_close(after[0], before[0])  # upstream untouched
    assert torch.equal(after[1][0, 2], value) and torch.equal(after[1][1, 4], value)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 2] = keep[1, 4] = False
    torch.testing.assert_close(after[1][keep], before[1][keep])
    torch.testing.assert_close(after[2][0, :2], before[2][0, :2])  # causal: earlier tokens unchanged
    assert not torch.allclose(after[2][0, 2:], before[2][0, 2:])  # later tokens feel the patch
    with capture_residual(model, [1]) as added, patch_residual(model, 1, torch.tensor([2, 4]), value, mode="add"):
        model(input_ids=ids)
    torch.testing.assert_close(added[1][0, 2], before[1][0, 2] + 3.0)


def test_patch_onward_covers_every_later_position_of_a_forward():
    model = tiny_models()["llama"]
    ids = torch.randint(0, 50, (2, 6))
    with capture_residual(model, [1]) as before:
        model(input_ids=ids)
    value = torch.full((16,), 3.0)
    pos = torch.tensor([2, 4])
    with capture_residual(model, [1]) as after, patch_residual(model, 1, pos, value, onward=True):
        model(input_ids=ids)
    for row, p in enumerate(pos.tolist()):
        assert (after[1][row, p:] == value).all()  # the position and every later one
        torch.testing.assert_close(after[1][row, :p], before[1][row, :p])  # nothing before it
    with pytest.raises(IndexError):  # the hook is removed when the forward raises, onward too
        with patch_residual(model, 1, pos, value, onward=True):
            model(input_ids=torch.full((1, 4), 999))
    assert all(len(b._forward_hooks) == 0 for b in find_decoder_layers(model))


def test_capture_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = tiny_models()["llama"]
    ids = torch.randint(0, 50, (2, 5))
    with capture_residual(model, [1]) as plain:
        model(input_ids=ids)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert len(find_decoder_layers(wrapped)) == 3
    with capture_residual(wrapped, [1]) as cap:
        wrapped(input_ids=ids)
    torch.testing.assert_close(cap[1], plain[1])  # LoRA starts as the identity (B = 0)
