"""Hugging Face interop: local HF model folders in, HF model folders out. Nothing is downloaded.

    import_hf(DIR, CKPT)   config.json + safetensors (one file or shards with an index) +
                           tokenizer.json of a Llama, Mistral or Qwen2 model -> our checkpoint
    export_hf(CKPT, DIR)   our checkpoint -> a folder `AutoModelForCausalLM` / `AutoTokenizer`
                           load as they are (a reward or classifier checkpoint: a sequence-
                           classification model); `adapter=True`: a PPO run's LoRA as a peft adapter

Our parameter names are Hugging Face Llama's, so weights move without a renaming table; what
this module does is map the configs, check every key and shape, and reconcile the tokenizer:

- Families: Llama 2/3 (GQA, tied embeddings, Llama 3.1's "llama3" rope scaling), Mistral (with
  no sliding window, or one at least as long as the context used) and Qwen2 (q/k/v biases).
  Anything else is refused with the key that makes it unsupported.
- Our stages need our special tokens (`tokenizer.SPECIAL_TOKENS`: pad, bos, eos and the chat
  roles). Those a source tokenizer lacks are added as new tokens; their rows in the embedding
  and lm_head start at the mean of the model's existing rows. The model's own bos/eos are not
  reused: `Tokenizer` finds the special tokens by their text, so a second name for each would
  need a mapping in every stage. The source's chat template is kept in config.json for
  reference; our stages use the one template of `render_chat`, and exports carry it as Jinja.
- Imports are stored in fp32 (what every stage trains in; upcasting bf16/fp16 is exact) and the
  source dtype is recorded, so exporting an untouched import restores every tensor bit for bit.

Only `tokenizers`, `safetensors` and `torch` are used: transformers and peft are not needed to
import or export, only to use the result (and in the tests that check it).

This module gathers the public names of the modules that do the work:
    hf_config      config.json: the family, ModelConfig from it (rope scaling) and back
    hf_weights     safetensors: which files, shapes expected, tensors checked and read
    hf_tokenizer   tokenizer.json in (our special tokens added) and out, CHAT_TEMPLATE
    hf_import      import_hf, summary_line
    hf_export      export_hf (a model, or a PPO run's LoRA as a peft adapter), export_line
"""
from llmtrain.interop.hf_config import ARCHITECTURES, family_of, hf_config_json, model_config_from_hf
from llmtrain.interop.hf_export import DTYPES, SCORE_STAGES, export_hf, export_line
from llmtrain.interop.hf_import import import_hf, summary_line
from llmtrain.interop.hf_tokenizer import CHAT_TEMPLATE, export_tokenizer, import_tokenizer
from llmtrain.interop.hf_weights import expected_shapes, module_with, read_weights, weight_files

__all__ = ["ARCHITECTURES", "CHAT_TEMPLATE", "DTYPES", "SCORE_STAGES", "expected_shapes", "export_hf", "export_line",
           "export_tokenizer", "family_of", "hf_config_json", "import_hf", "import_tokenizer", "model_config_from_hf",
           "module_with", "read_weights", "summary_line", "weight_files"]
