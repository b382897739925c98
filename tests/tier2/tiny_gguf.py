"""Write a tiny llama GGUF with random weights and a real vocabulary.

Usage: tiny_gguf.py VOCAB.gguf OUT.gguf

The vocabulary (tokenizer.* keys) is copied from VOCAB.gguf, one of the
vocab-only files llama.cpp ships under models/ (ggml-vocab-llama-spm.gguf:
LLaMA's SentencePiece vocabulary). The weights are random (seeded), F32, so
no quantised layout (nor repacking) is involved: the answers are nonsense,
but llama-server loads, tokenizes, prefills and decodes as for a real model.
"""

import sys

import numpy as np
import gguf

N_EMBD = 256
N_LAYER = 4
N_HEAD = 4
N_FF = 512
N_CTX = 4096


def main(vocab_path: str, out_path: str) -> None:
    vocab = gguf.GGUFReader(vocab_path)
    tokens = vocab.fields["tokenizer.ggml.tokens"].contents()
    n_vocab = len(tokens)
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name("anteroom-tiny-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in vocab.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, kind)

    rng = np.random.default_rng(20261201)

    def tensor(name: str, *shape: int, scale: float = 0.02) -> None:
        # gguf's shapes are numpy's (rows, columns): ne reversed.
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", n_vocab, N_EMBD)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    tensor("output.weight", n_vocab, N_EMBD)
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for w in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{w}.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out_path}: {n_vocab} tokens, {N_LAYER} layers of {N_EMBD}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
