"""Real models: HF transformers families (eager attention, random weights built from tiny configs, no downloads)
compiled with memattn, training and inference, static and dynamic shapes. For every model: exactly one rewritten
site per attention module, none left, outputs and parameter gradients as close to the fp64 truth as eager's.

Family notes (what each one exercises):
  gpt2         causal mask built by HF's masking utils, proven causal   llama      GQA (repeat_kv), RoPE
  llama_pad    causal + padding: data, so the mask is passed to the kernel as a tensor bias
  mistral      sliding window (mask passed as a tensor)                  bert       padding mask, bidirectional
  gemma2       tanh logit soft-capping, alternating sliding layers       t5         relative position bias, cross
  bloom        ALiBi through baddbmm(beta=1, alpha=1/sqrt(d))           falcon     in-place ``scores /= sqrt(d)``, MQA
  mpt          ALiBi added to the scores, boolean causal fill            gpt_bigcode MQA (one kv head)
  bart/opt     encoder-decoder / decoder with scaled q                   mixtral    MoE router softmax is not a site
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attn_compiler  # noqa: E402
from helpers import check_model  # noqa: E402

T = transformers
SEQ = 19  # crosses the 16-wide reference tiles of conftest unevenly
VOCAB = 128
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64)
NO_DROPOUT = dict(attention_dropout=0.0, hidden_dropout=0.0)


NO_GPT_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
BERT_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT_SMALL = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)

# family -> (model class, config class, config arguments, extra inputs); every model is built from its config with
# random weights, eager attention and no dropout (kernel dropout draws differ from eager's).
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(**GPT_SMALL, **NO_GPT_DROPOUT), None),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(**SMALL, num_key_value_heads=2), None),
    "llama_pad": ("LlamaForCausalLM", "LlamaConfig", dict(**SMALL, num_key_value_heads=2), "right_pad"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(**SMALL, num_key_value_heads=2, sliding_window=8), None),
    "bert": ("BertModel", "BertConfig", dict(**SMALL, **BERT_NO_DROPOUT), "right_pad"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0), None),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
                dropout_rate=0.0, relative_attention_num_buckets=8), "decoder"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                      **NO_DROPOUT), None),
    "falcon": ("FalconForCausalLM", "FalconConfig",
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, alibi=False,
                    multi_query=True, new_decoder_architecture=False, **NO_DROPOUT), None),
    "mpt": ("MptForCausalLM", "MptConfig", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                                                vocab_size=VOCAB, max_seq_len=64), None),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(**GPT_SMALL, multi_query=True,
                                                                      **NO_GPT_DROPOUT), None),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(**GPT_SMALL, rotary_dim=8, **NO_GPT_DROPOUT), None),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(**SMALL, **NO_DROPOUT), None),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                 max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0), None),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0), "decoder"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(**SMALL, num_key_value_heads=2), None),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(**SMALL, num_key_value_heads=2, head_dim=16), None),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(**SMALL, num_key_value_heads=2), None),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(**SMALL, num_key_value_heads=2, pad_token_id=0), None),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(**SMALL, num_key_value_heads=1, head_dim=16), None),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(**SMALL, num_key_value_heads=2, head_dim=16,
                                                             sliding_window=8), None),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(**SMALL, num_key_value_heads=2, num_local_experts=2,
                                                            num_experts_per_tok=1), None),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config",
                   dict(**SMALL, num_key_value_heads=2, residual_dropout=0.0, embedding_dropout=0.0), None),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", dict(**SMALL, num_key_value_heads=2), None),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", dict(**SMALL, num_key_value_heads=2), None),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(**SMALL, num_key_value_heads=2), None),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(**SMALL, num_key_value_heads=2), None),
    "persimmon": ("PersimmonForCausalLM", "PersimmonConfig", dict(**SMALL), None),
    "roberta": ("RobertaModel", "RobertaConfig", dict(**SMALL, **BERT_NO_DROPOUT), "right_pad"),
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0), "right_pad"),
}
FAMILIES = {name: spec for name, spec in FAMILIES.items() if hasattr(T, spec[0])}  # older transformers lack some

# Families whose attention is left alone on purpose, with the reason the report must give.
LEFT = {
    # (scores + alibi) *= 1/sqrt(d), then + mask: scaling after a bias is not folded (tests/test_safety.py pins it)
    "falcon_alibi": ("FalconForCausalLM", "FalconConfig",
                     dict(FAMILIES["falcon"][2], alibi=True), None, "scaled after a mask or bias"),
}

CORE = ["gpt2", "llama", "mistral", "bert", "gemma2", "t5", "bloom"]
# CI (the module must stay fast on a 2-core machine): every core family trained with dynamic shapes and run for
# inference with static ones; every other family once, static, alternating training and inference. The rest of the
# grid is marked slow (python -m pytest -m slow tests/test_hf_models.py).
FAST = [(f, True, True) for f in CORE] + [(f, False, False) for f in CORE]
SLOW_ONLY = {"mixtral"}  # graph breaks in the MoE routing make it 15 s a case
FAST += [(f, i % 2 == 0, False) for i, f in enumerate(f for f in FAMILIES if f not in CORE and f not in SLOW_ONLY)]
CASES = FAST + [pytest.param(f, t, d, marks=pytest.mark.slow) for f in FAMILIES for t in (True, False)
                for d in (False, True) if (f, t, d) not in FAST]


def attention_modules(model) -> int:
    """Modules named *Attention that hold no other *Attention module (BertSelfAttention, not BertAttention)."""
    def is_attn(m):
        return type(m).__name__.endswith("Attention")
    return sum(1 for m in model.modules() if is_attn(m) and not any(is_attn(c) for c in m.modules() if c is not m))


class Logits(torch.nn.Module):
    """Token ids in, float logits (or hidden states) out, so check_model can compare outputs and gradients."""

    def __init__(self, hf, extra):
        super().__init__()
        self.hf, self.extra = hf, extra

    def forward(self, ids, mask=None, dec=None):
        kw = {"input_ids": ids}
        if mask is not None:
            kw["attention_mask"] = mask
        if dec is not None:
            kw["decoder_input_ids"] = dec
        if not self.training and "use_cache" in self.hf.forward.__code__.co_varnames:
            kw["use_cache"] = True  # the prefill path of generation: KV cache objects in the graph
        out = self.hf(**kw)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def _inputs(extra):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    mask = dec = None
    if extra == "right_pad":
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, SEQ - 6:] = 0
    elif extra == "decoder":
        dec = torch.randint(1, VOCAB, (2, SEQ - 4), generator=g)
    return [ids, mask, dec]


def _build(model_cls, config_cls, kwargs):
    torch.manual_seed(0)
    config = getattr(T, config_cls)(**kwargs)
    # eager attention (the spelling memattn rewrites); MoE experts as plain modules (the grouped-mm kernel has no
    # fp64, which the truth run needs)
    hf = getattr(T, model_cls)._from_config(config, attn_implementation="eager", experts_implementation="eager")
    assert hf.config._attn_implementation == "eager"
    return hf


def _case_id(case):
    f, t, d = case.values if hasattr(case, "values") else case
    return f"{f}-{'train' if t else 'eval'}-{'dynamic' if d else 'static'}"


# Families the eager model itself cannot compile in one graph (Mixtral's MoE routing is data-dependent): compiled
# without fullgraph, and memattn must make exactly as many graphs as Dynamo's plain eager backend.
NOT_FULLGRAPH = {"mixtral"}


def _graph_count(model, inputs, dynamic) -> int:
    count = 0

    def counting(gm, example_inputs):
        nonlocal count
        count += 1
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=counting, dynamic=dynamic)(*inputs)
    torch._dynamo.reset()
    return count


def _check(family, spec, extra, train, dynamic, rewritten, left):
    """check_model over every graph of the compiled model; returns the sites of the compiled run."""
    hf = _build(*spec)
    model, inputs = Logits(hf, extra).train(train), _inputs(extra)
    fullgraph = family not in NOT_FULLGRAPH
    graphs = None if fullgraph else _graph_count(model, inputs, dynamic)
    before = len(attn_compiler.reports())
    check_model(model, inputs, torch.float32, dynamic=dynamic, fullgraph=fullgraph, train=train)
    reports = attn_compiler.reports()[before:]
    sites = [s for r in reports for s in r.sites]
    summary = "\n".join(str(r) for r in reports)
    assert len([s for s in sites if s.status == "rewritten"]) == rewritten, summary
    assert len([s for s in sites if s.status == "left"]) == left, summary
    if graphs is not None:
        assert len(reports) == graphs, f"{len(reports)} graphs with memattn, {graphs} with the eager backend"
    return sites


@pytest.mark.parametrize("family,train,dynamic", CASES, ids=[_case_id(c) for c in CASES])
def test_family(family, train, dynamic):
    *spec, extra = FAMILIES[family]
    n = attention_modules(_build(*spec))
    assert n > 0
    sites = _check(family, spec, extra, train, dynamic, rewritten=n, left=0)
    flags = [s.flags for s in sites]
    if family in ("gpt2", "llama"):
        assert all(f["causal"] and not f["bias"] for f in flags), flags
    if family == "llama":
        assert all(f["gqa"] == "GQA" for f in flags)
    if family in ("bloom", "mpt", "t5"):  # ALiBi / relative position bias passed to the kernel, not dropped
        assert all(f["bias"] >= 1 for f in flags), flags
    if family == "gemma2":
        assert all(f["softcap"] == 50.0 for f in flags)


@pytest.mark.parametrize("family", list(LEFT))
def test_left_alone_with_reason(family):
    *spec, extra, reason = LEFT[family]
    n = attention_modules(_build(*spec))
    sites = _check(family, spec, extra, False, False, rewritten=0, left=n)
    assert all(reason in s.reason for s in sites), [s.reason for s in sites]
