"""Checkpoints: safetensors weights + JSON metadata + training state, written atomically.

A run directory holds `checkpoints/step_NNNNNNN/` folders, each complete or absent:
    model.safetensors   the weights (HF Llama names; a tied lm_head is not stored twice)
    config.json         {"model": ModelConfig, "stage": ..., "config": the stage's whole config}
    meta.json           progress: step, tokens seen, last losses, data-loader state
    tokenizer.json      a copy, so a checkpoint is usable on its own
    chat_template.jinja, tokenizer_config.json
                        a model's own chat template and its tokens (imported models; see
                        tokenizer.py), copied from stage to stage; absent: ours
    train_state.pt      optimizer state, RNG state of rank 0 (rng_rank{r}.pt for other ranks), and
                        what else a stage needs to resume (e.g. PPO's value model and LoRA adapters)

"The checkpoint" handed from stage to stage may be a step folder or a run directory; a run
directory means its latest complete step. In three modules:
    folders   the step folders of a run: which are complete (step_dirs), which one a path means (resolve)
    saving    save (atomic: temp folder, fsync, rename), prune, the sharded (FSDP2/DCP) save
    loading   every file read back and checked before use: config, meta, weights, train state
"""
from llmtrain.checkpoint.folders import READY, STEP_RE, TRASH, resolve, step_dirs
from llmtrain.checkpoint.loading import (LIMITS, load_model_and_optimizer, load_train_state, load_transformer,
                                         load_weights, model_config, read_config, read_meta, tokenizer_of)
from llmtrain.checkpoint.saving import model_state, prune, save

__all__ = ["LIMITS", "READY", "STEP_RE", "TRASH", "load_model_and_optimizer", "load_train_state", "load_transformer",
           "load_weights", "model_config", "model_state", "prune", "read_config", "read_meta", "resolve", "save",
           "step_dirs", "tokenizer_of"]
