from llmtrain.model.transformer import Backbone, KVCache, Transformer

__all__ = ["Backbone", "KVCache", "Transformer"]
