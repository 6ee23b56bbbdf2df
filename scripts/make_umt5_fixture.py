"""Make the tiny umT5 encoder / tokenizer / torch-checkpoint fixtures with PyTorch + transformers (CPU).

Writes tests/fixtures/umt5_tiny/:
  tokenizer/tokenizer.json, tokenizer/tokenizer_config.json
      a tiny `tokenizers` Unigram model (T5 conventions: <pad> 0, </s> 1, <unk> 2,
      Metaspace pre-tokenizer, "$A </s>" post-processor) trained on a few sentences;
  transformers/config.json, transformers/model.safetensors
      a random tiny `UMT5EncoderModel` (vocab 128, d_model 32, 2 layers, 4 heads of 8,
      d_ff 64, 32 buckets, max distance 128) in transformers' layout;
  original/umt5_tiny.pth, original/umt5_tiny.safetensors
      the same weights under the original Wan2.1 (`wan/modules/t5.py`) key names, the
      .pth written by `torch.save`; the renaming is checked here by running a small
      re-implementation of Wan's T5 encoder on the renamed weights;
  io.npz: ids [3, 64] (lengths 64, 37, 5: relative positions beyond the 8 exact
      buckets and up to 63), mask, transformers' `last_hidden_state` (float32);
  tokens.npz: prompts, transformers' T5Tokenizer ids/mask of the cleaned prompts (as
      diffusers' WanPipeline cleans them) at max_length 16 (some truncated) and 64, and
      the Wan-style embeddings of the prompts and of the negative prompt at max_length 64
      (positions past each prompt's tokens zeroed);
  torch_ckpt/*.pth + torch_ckpt/expected.npz: `torch.save` files for the torch-free reader
      (float32, bf16, fp16, int64, bool, a transposed view, an offset slice, a
      parameter, a wrapped training checkpoint, a module's state_dict, a legacy non-zip
      file).

Run (needs torch, transformers and tokenizers; the tests need none of them):
  /path/to/torch/python scripts/make_umt5_fixture.py [--out tests/fixtures/umt5_tiny]
"""

import argparse
import collections
import html
import json
import math
import os
import re

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

TINY = dict(
    vocab_size=128,
    d_model=32,
    num_layers=2,
    num_heads=4,
    d_kv=8,
    d_ff=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
)

SENTENCES = [
    "a cat walking on the grass in the sun",
    "a red car driving down a rainy street at night",
    "two dogs playing with a ball on the beach",
    "a bird flying over the mountains and rivers",
    "close-up of a flower opening in spring, time-lapse",
    "an old man reading a book by the window",
    "a spaceship landing on a desert planet, cinematic lighting",
    "waves crashing against rocks",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality",
]
PROMPTS = [
    "a cat on the beach, zebra!",
    "  multiple   spaces\tand  Ünïcode  ",
    "a red car driving down a rainy street at night while two dogs play with a ball on the beach",
    "waves",
]
NEGATIVE = "Bright tones, overexposed, static, blurred details, worst quality"


def clean(text: str) -> str:
    """Wan's prompt cleaning without ftfy: HTML unescape (twice), collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


# --------------------------------------------------------------------------- tokenizer
def make_tokenizer(out: str) -> None:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", max_piece_length=8
    )
    tok.train_from_iterator(SENTENCES, trainer)
    assert (tok.token_to_id("<pad>"), tok.token_to_id("</s>"), tok.token_to_id("<unk>")) == (0, 1, 2)
    assert tok.get_vocab_size() <= TINY["vocab_size"]
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "T5Tokenizer",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "extra_ids": 0,
                "model_max_length": 512,
            },
            f,
            indent=1,
        )


# --------------------------------------------------------------------------- Wan's layout
def to_original(sd: dict) -> dict:
    """transformers UMT5EncoderModel keys -> Wan2.1 `T5Encoder` keys."""
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(TINY["num_layers"]):
        p = f"encoder.block.{i}.layer."
        out[f"blocks.{i}.norm1.weight"] = sd[p + "0.layer_norm.weight"]
        for n in "qkvo":
            out[f"blocks.{i}.attn.{n}.weight"] = sd[p + f"0.SelfAttention.{n}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = sd[p + "0.SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm2.weight"] = sd[p + "1.layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = sd[p + "1.DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = sd[p + "1.DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = sd[p + "1.DenseReluDense.wo.weight"]
    return out


def wan_t5_forward(w: dict, ids, mask):
    """A compact re-implementation of Wan2.1's T5Encoder forward (to check `to_original`)."""
    nb, md, heads = TINY["relative_attention_num_buckets"], TINY["relative_attention_max_distance"], TINY["num_heads"]

    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def buckets(n):
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        half = nb // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(md / exact) * (half - exact)).long()
        return out + torch.where(rel < exact, rel, torch.clamp(large, max=half - 1))

    b, n = ids.shape
    x = w["token_embedding.weight"][ids]
    bk = buckets(n)
    for i in range(TINY["num_layers"]):
        g = lambda k, i=i: w[f"blocks.{i}.{k}"]  # noqa: E731
        h = rms(x, g("norm1.weight"))
        q, k, v = [(h @ g(f"attn.{c}.weight").T).view(b, n, heads, -1) for c in "qkv"]
        s = torch.einsum("binc,bjnc->bnij", q, k) + g("pos_embedding.embedding.weight")[bk].permute(2, 0, 1)[None]
        s = s.masked_fill(mask[:, None, None, :] == 0, torch.finfo(s.dtype).min)
        a = torch.einsum("bnij,bjnc->binc", s.softmax(-1), v).reshape(b, n, -1)
        x = x + a @ g("attn.o.weight").T
        h = rms(x, g("norm2.weight"))
        gate = torch.nn.functional.gelu(h @ g("ffn.gate.0.weight").T, approximate="tanh")
        x = x + ((h @ g("ffn.fc1.weight").T) * gate) @ g("ffn.fc2.weight").T
    return rms(x, w["norm.weight"])


# --------------------------------------------------------------------------- torch_checkpoint fixtures
def make_torch_ckpt(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 6, generator=g)
    flat = collections.OrderedDict()
    flat["f32"] = base
    flat["bf16"] = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    flat["fp16"] = torch.randn(7, generator=g).to(torch.float16)
    flat["i64"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
    flat["bool"] = torch.tensor([True, False, True])
    flat["scalar"] = torch.tensor(2.5)
    flat["transposed"] = base.t()  # shares base's storage, strides (1, 6)
    flat["offset_slice"] = base[1:3, 2:5]  # storage offset 8, strides (6, 1)
    flat["strided"] = base[::2, ::3]  # strides (12, 3)
    flat["bf16_view"] = flat["bf16"][:, 1]  # offset 1, stride 5, bf16
    flat["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    flat["empty"] = torch.zeros(0, 3)
    torch.save(flat, os.path.join(out, "flat.pth"))

    wrapped = {
        "state_dict": {"encoder": {"w": flat["f32"], "b": flat["fp16"]}, "head.w": flat["bf16"]},
        "epoch": 3,
        "optimizer_name": "adam",
    }
    torch.save(wrapped, os.path.join(out, "wrapped.pth"))
    torch.save({"w": torch.ones(2)}, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)
    # a module's state_dict, as Wan saved its T5 (an OrderedDict carrying a `_metadata` attribute)
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    torch.save(lin.state_dict(), os.path.join(out, "module.pth"))

    def np_of(t):
        t = t.detach()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    exp = {f"flat/{k}": np_of(v) for k, v in flat.items()}
    exp.update(
        {
            "wrapped/encoder.w": np_of(flat["f32"]),
            "wrapped/encoder.b": np_of(flat["fp16"]),
            "wrapped/head.w": np_of(flat["bf16"]),
            "module/weight": np_of(lin.weight),
            "module/bias": np_of(lin.bias),
        }
    )
    np.savez(os.path.join(out, "expected.npz"), **exp)


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "umt5_tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    tok_dir = os.path.join(args.out, "tokenizer")
    make_tokenizer(tok_dir)
    make_torch_ckpt(os.path.join(args.out, "torch_ckpt"))

    model = UMT5EncoderModel(UMT5Config(**TINY, attn_implementation="eager")).eval()
    with torch.no_grad():  # random everything, norms included, so no weight can hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(
                    torch.randn_like(p) / math.sqrt(p.shape[-1])
                    if p.ndim == 2 and "shared" not in name
                    else torch.randn_like(p)
                )
    tdir = os.path.join(args.out, "transformers")
    model.save_pretrained(tdir, safe_serialization=True)

    b, n = 3, 64
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = [64, 37, 5]
    ids = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.long)
    for r, ln in enumerate(lengths):
        ids[r, : ln - 1] = torch.randint(3, TINY["vocab_size"], (ln - 1,), generator=g)
        ids[r, ln - 1] = 1  # </s>
        mask[r, :ln] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    orig = to_original(sd)
    with torch.no_grad():
        ref = wan_t5_forward(orig, ids, mask)
    err = float((ref - out).norm() / out.norm())
    assert err < 1e-5, f"Wan-layout re-implementation disagrees with transformers: {err}"
    odir = os.path.join(args.out, "original")
    os.makedirs(odir, exist_ok=True)
    torch.save(collections.OrderedDict(orig), os.path.join(odir, "umt5_tiny.pth"))
    save_file(orig, os.path.join(odir, "umt5_tiny.safetensors"))
    np.savez_compressed(
        os.path.join(args.out, "io.npz"),
        ids=ids.numpy().astype(np.int32),
        mask=mask.numpy().astype(np.int32),
        out=out.numpy(),
    )

    # Tokenization and Wan-style prompt embeddings (as diffusers' WanPipeline computes them).
    tok = AutoTokenizer.from_pretrained(tok_dir)
    toks = {}
    for ml in (16, 64):
        t = tok(
            [clean(p) for p in PROMPTS],
            padding="max_length",
            max_length=ml,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        toks[f"ids_{ml}"] = t.input_ids.numpy().astype(np.int32)
        toks[f"mask_{ml}"] = t.attention_mask.numpy().astype(np.int32)

    def embed(texts):
        t = tok(
            texts,
            padding="max_length",
            max_length=64,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            e = model(t.input_ids, t.attention_mask).last_hidden_state
        lens = t.attention_mask.sum(1)
        return torch.stack([torch.cat([u[:v], u.new_zeros(64 - v, u.size(1))]) for u, v in zip(e, lens)]), lens

    ctx, lens = embed([clean(p) for p in PROMPTS])  # Wan and diffusers clean prompts first
    neg, _ = embed([clean(NEGATIVE)])
    np.savez(
        os.path.join(args.out, "tokens.npz"),
        prompts=np.array(PROMPTS),
        negative_prompt=np.array(NEGATIVE),
        lengths=lens.numpy().astype(np.int32),
        context=ctx.numpy(),
        negative_context=neg[0].numpy(),
        **toks,
    )

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(
        "wrote",
        os.path.abspath(args.out),
        f"({total / 1e6:.2f} MB); output norm",
        float(out.norm()),
        "tokenizer vocab",
        tok.vocab_size if hasattr(tok, "vocab_size") else "?",
    )


if __name__ == "__main__":
    main()
