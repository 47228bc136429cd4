"""Finetuning methods on tiny models built from configs: exact LoRA targets, freezing, save/load/merge."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lcd.finetuning import (
    FullFinetune,
    LayerFinetune,
    LoRA,
    count_parameters,
    decoder_layers_path,
    default_target_modules,
    lora_targets,
    trainable_parameter_names,
)
from lcd.layers import AllLayers, EarlyLayers, LateLayers, LayerList, LayerRange
from lcd.models import ICLTransformer

VOCAB = 64


def tiny_llama(n_layers=4):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gemma(n_layers=3):
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Gemma3ForCausalLM(config)


def tiny_gpt2(n_layers=2):
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=n_layers, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


LLAMA_BLOCK = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"] + [f"self_attn.{p}_proj" for p in "kvoq"]
GPT2_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def names(prefix, layers, block):
    return {f"{prefix}.{i}.{m}" for i in layers for m in block}


@pytest.mark.parametrize(
    ("make", "group", "prefix", "layers", "block"),
    [
        (tiny_llama, EarlyLayers(count=2), "model.layers", [0, 1], LLAMA_BLOCK),
        (tiny_llama, LateLayers(count=2), "model.layers", [2, 3], LLAMA_BLOCK),
        (tiny_llama, LayerList([0]), "model.layers", [0], LLAMA_BLOCK),  # layer 0 alone
        (tiny_gemma, EarlyLayers(fraction=0.333), "model.layers", [0], LLAMA_BLOCK),  # resolves to layer 0
        (tiny_gemma, LateLayers(fraction=0.333), "model.layers", [2], LLAMA_BLOCK),
        (tiny_gemma, AllLayers(), "model.layers", [0, 1, 2], LLAMA_BLOCK),
        (tiny_gpt2, EarlyLayers(count=1), "transformer.h", [0], GPT2_BLOCK),
        (tiny_gpt2, LateLayers(count=1), "transformer.h", [1], GPT2_BLOCK),
    ],
)
def test_lora_targets_exactly_the_chosen_blocks(make, group, prefix, layers, block):
    model = make()
    assert decoder_layers_path(model) == prefix
    method = LoRA(group)
    peft_model = method.apply(model)
    assert lora_targets(peft_model) == names(prefix, layers, block)
    assert method.resolved_layers == layers
    trainable = trainable_parameter_names(peft_model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 16, 0.1)  # PAPER.md §5 defaults
    assert config.fan_in_fan_out == (make is tiny_gpt2)  # GPT-2's Conv1D stores weights transposed


def test_lora_custom_targets():
    peft_model = LoRA(LateLayers(count=1), target_modules=["q_proj", "v_proj"]).apply(tiny_llama())
    assert lora_targets(peft_model) == names("model.layers", [3], ["self_attn.q_proj", "self_attn.v_proj"])


def test_lora_on_synthetic_model():
    net = ICLTransformer(n_dims=4, n_pairs=4, n_layers=2, d_model=16, n_heads=2)
    peft_model = LoRA(LayerList([0])).apply(net)
    assert lora_targets(peft_model) == names("backbone.h", [0], GPT2_BLOCK)
    xs, ys = torch.randn(3, 4, 4), torch.randn(3, 4)
    assert peft_model(xs, ys).shape == (3, 4)


@pytest.mark.parametrize("method", [LoRA(LayerList([1]), dropout=0.0), LayerFinetune(LayerList([1]))])
def test_methods_on_synthetic_model_train_save_and_load(method, tmp_path):
    def net():
        torch.manual_seed(0)
        return ICLTransformer(n_dims=4, n_pairs=4, n_layers=2, d_model=16, n_heads=2)

    model = method.apply(net())
    assert trainable_parameter_names(model) and all(".h.1." in n for n in trainable_parameter_names(model))
    xs, ys = torch.randn(3, 4, 4), torch.randn(3, 4)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        ((model(xs, ys) - ys) ** 2).mean().backward()
        optim.step()
        optim.zero_grad()
    method.save(model, tmp_path)
    loaded = method.load(net(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs, ys), model(xs, ys))
        assert not torch.allclose(net()(xs, ys), model(xs, ys))
        torch.testing.assert_close(method.merge(loaded)(xs, ys), model(xs, ys), atol=1e-5, rtol=1e-5)


def test_default_targets_are_the_linear_modules_of_a_block():
    assert default_target_modules(tiny_llama(), [0]) == sorted(LLAMA_BLOCK)
    assert default_target_modules(tiny_gpt2(), [1]) == GPT2_BLOCK


def test_lora_errors_before_work():
    with pytest.raises(ValueError, match="out of range"):
        LoRA(LayerList([7])).apply(tiny_llama())
    with pytest.raises(ValueError, match="selects no layer"):
        LoRA(LayerRange(3, 3)).apply(tiny_llama())
    with pytest.raises(ValueError):
        LoRA(EarlyLayers(count=1), target_modules=["no_such_module"]).apply(tiny_llama())
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoRA(target_modules=[])


def step(model, seed=0):
    """One AdamW step on a random next-token batch; returns the parameters before the step."""
    torch.manual_seed(seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    return before


@pytest.mark.parametrize(
    ("method", "changed_blocks"),
    [(LoRA(EarlyLayers(count=1)), {0}), (LoRA(LateLayers(count=1)), {3}), (LayerFinetune(LayerList([0, 2])), {0, 2})],
)
def test_frozen_parameters_unchanged_after_a_step(method, changed_blocks):
    model = method.apply(tiny_llama())
    before = step(model)
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if p.requires_grad:
            if ".lora_A." in name:
                continue  # lora_B starts at zero, so lora_A gets no gradient on the first step
            assert moved, f"trainable {name} did not move"
            assert any(f"layers.{i}." in name for i in changed_blocks), name
        else:
            assert not moved, f"frozen {name} changed"


def test_layer_finetune_trains_exactly_the_blocks():
    model = LayerFinetune(LateLayers(count=1)).apply(tiny_gpt2())
    assert {n.split(".")[2] for n in trainable_parameter_names(model)} == {"1"}
    assert all(n.startswith("transformer.h.1.") for n in trainable_parameter_names(model))


def test_full_finetune_trains_everything():
    model = FullFinetune().apply(tiny_gemma())
    trainable, total = count_parameters(model)
    assert trainable == total


def test_lora_save_load_merge_give_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    base_state = tiny_llama().state_dict()

    def fresh():
        model = tiny_llama()
        model.load_state_dict(base_state)
        return model

    method = LoRA(LateLayers(count=2))
    trained = method.apply(fresh())
    for _ in range(2):  # two steps: lora_B leaves zero, then lora_A moves too
        step(trained)
    trained.eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base_logits = fresh()(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter does something

    method.save(trained, tmp_path / "adapter")
    loaded = method.load(fresh(), tmp_path / "adapter").eval()
    assert lora_targets(loaded) == lora_targets(trained)
    merged = method.merge(loaded).eval()
    assert not lora_targets(merged) and type(merged) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_layer_finetune_save_load(tmp_path):
    torch.manual_seed(0)
    base_state = tiny_gpt2().state_dict()
    method = LayerFinetune(EarlyLayers(count=1))
    trained = tiny_gpt2()
    trained.load_state_dict(base_state)
    trained = method.apply(trained)
    step(trained)
    method.save(trained, tmp_path)
    fresh = tiny_gpt2()
    fresh.load_state_dict(base_state)
    loaded = method.load(fresh, tmp_path)
    for (n, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
