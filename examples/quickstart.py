"""Load a tiny Llama with MultiMax attention and print its MultiMax parameters (runs offline in seconds)."""

import tempfile

from transformers import AutoModelForCausalLM, LlamaConfig

import hf_multimax  # registers attn_implementation="multimax"

config = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
path = tempfile.mkdtemp()
AutoModelForCausalLM.from_config(config).save_pretrained(path)  # a plain SoftMax checkpoint, as on the Hub
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax", multimax_init="paper")
for name, seglu in hf_multimax.multimax_modules(model).items():
    print(
        f"{name}: multimax_ranges={seglu.multimax_ranges.data.tolist()}\n"
        f"{' ' * len(name)}  multimax_ts={seglu.multimax_ts.data.tolist()}"
    )
