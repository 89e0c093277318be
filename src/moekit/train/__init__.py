"""Training: data, tokenizers, configs and presets, the trainer, checkpoints, metrics."""
from moekit.train.allocator import keep_freed_memory
from moekit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moekit.train.compare import comparison_rows, comparison_table
from moekit.train.config import (
                                 PRESETS,
                                 DataConfig,
                                 OptimConfig,
                                 RunConfig,
                                 TrainConfig,
                                 apply_overrides,
                                 config_from_dict,
                                 get_preset,
                                 load_toml,
                                 variant_model_config,
)
from moekit.train.data import (
                                 BatchSampler,
                                 Corpus,
                                 build_corpus,
                                 eval_batches,
                                 fetch_shakespeare,
                                 load_shakespeare,
                                 load_text_files,
                                 split_documents,
)
from moekit.train.experiment import load_results, load_run_config, run_experiment, train_seeds
from moekit.train.metrics import MetricsLogger, read_metrics
from moekit.train.mnist import MNIST5k, load_mnist_5k
from moekit.train.sample import generate_text, load_model
from moekit.train.tokenizer import ByteTokenizer, CharTokenizer
from moekit.train.trainer import NonFiniteLossError, Trainer, lr_at, train_variant

__all__ = [
    "RunConfig", "DataConfig", "OptimConfig", "TrainConfig", "PRESETS", "get_preset", "apply_overrides",
    "config_from_dict", "load_toml", "variant_model_config",
    "fetch_shakespeare", "load_shakespeare", "load_text_files", "split_documents", "Corpus", "build_corpus",
    "BatchSampler", "eval_batches", "CharTokenizer", "ByteTokenizer",
    "Trainer", "train_variant", "NonFiniteLossError", "lr_at", "run_experiment", "load_results",
    "load_run_config", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "MetricsLogger",
    "read_metrics", "MNIST5k", "load_mnist_5k", "comparison_rows", "comparison_table", "load_model", "generate_text",
    "keep_freed_memory", "train_seeds",
]
