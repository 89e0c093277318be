"""Reusable networks built from moekit layers and the paradigm methods that train them: the decoder-only
transformer LM, the V-MoE ViT, multi-task / multi-domain towers, continual learning (task-routed nets,
Expert Gate), RL agents (PPO torsos, Soft MoE DQN, PMOE policies for SAC), CondConv super-resolution
nets, Swin2-MoSE (Swin V2 SR with MoE-SM FFNs) and its SSIM / NCC losses, Prototypical Networks, the
binary-expert artifact detector for histopathology."""
from moekit.models.transformer import (
                                     KVCache,
                                     TransformerConfig,
                                     TransformerLM,
                                     dense_twin,
                                     flops_per_token,
                                     param_counts,
)

__all__ = ["TransformerConfig", "TransformerLM", "KVCache", "dense_twin", "flops_per_token", "param_counts"]

from moekit.models.vision import ViTConfig, ViTMoE, active_param_counts, vit_dense_twin  # noqa: E402

__all__ += ["ViTConfig", "ViTMoE", "active_param_counts", "vit_dense_twin"]

from moekit.models.multitask import MultiTaskConfig, MultiTaskModel, TabularEmbedding  # noqa: E402

__all__ += ["MultiTaskConfig", "MultiTaskModel", "TabularEmbedding"]

from moekit.models.multitask_vit import (  # noqa: E402  (METHODS.md MT4 Mod-Squad, MT5 M³ViT)
                                     MULTITASK_VIT_METHODS,
                                     MultiTaskViT,
                                     MultiTaskViTConfig,
                                     TaskSpec,
                                     extract_task_submodel,
                                     multitask_active_params,
                                     multitask_vit_config,
                                     task_expert_counts,
)

__all__ += ["MultiTaskViT", "MultiTaskViTConfig", "TaskSpec", "multitask_vit_config", "MULTITASK_VIT_METHODS",
            "task_expert_counts", "extract_task_submodel", "multitask_active_params"]

from moekit.models.continual import (  # noqa: E402
                                     GrowingTaskRouter,
                                     TaskIncrementalNet,
                                     accuracy_matrix,
                                     average_accuracy,
                                     average_forgetting,
                                     backward_transfer,
                                     dense_task_net,
                                     distillation_kl,
                                     start_task,
                                     task_moe_net,
                                     token_moe_net,
                                     train_sequentially,
                                     train_task,
)

__all__ += ["GrowingTaskRouter", "TaskIncrementalNet", "accuracy_matrix", "average_accuracy", "average_forgetting",
            "backward_transfer", "dense_task_net", "distillation_kl", "start_task", "task_moe_net", "token_moe_net",
            "train_sequentially", "train_task"]

from moekit.models.rl import (  # noqa: E402
                                     ActorCritic,
                                     ActorCriticConfig,
                                     ContextMixtureEncoders,
                                     DQNConfig,
                                     MixtureGaussianPolicy,
                                     MultiTaskObsEncoder,
                                     OrthogonalExperts,
                                     PPOConfig,
                                     QNetwork,
                                     QNetworkConfig,
                                     SACConfig,
                                     actor_critic_dense_twin,
                                     gae_advantages,
                                     hard_task_moe,
                                     train_dqn,
                                     train_ppo,
                                     train_sac,
)

__all__ += ["ActorCritic", "ActorCriticConfig", "PPOConfig", "actor_critic_dense_twin", "gae_advantages", "train_ppo",
            "QNetworkConfig", "QNetwork", "DQNConfig", "train_dqn", "MixtureGaussianPolicy", "SACConfig", "train_sac",
            "OrthogonalExperts", "ContextMixtureEncoders", "MultiTaskObsEncoder", "hard_task_moe"]

from moekit.models.superres import SRNet, bicubic_upsample, condconv_from_dense, downsample, psnr, sr_macs  # noqa: E402

__all__ += ["SRNet", "bicubic_upsample", "condconv_from_dense", "downsample", "psnr", "sr_macs"]

from moekit.models.fewshot import (  # noqa: E402
                                     Episode,
                                     EpisodeSampler,
                                     ProtoEmbedding,
                                     active_ffn_params,
                                     dense_proto_net,
                                     evaluate_episodes,
                                     meta_train,
                                     moe_proto_net,
                                     proto_logits,
                                     prototypes,
)

__all__ += ["Episode", "EpisodeSampler", "ProtoEmbedding", "active_ffn_params", "dense_proto_net", "evaluate_episodes",
            "meta_train", "moe_proto_net", "proto_logits", "prototypes"]

from moekit.models.expert_gate import ExpertGate, GatedAccuracy, gated_accuracy, gated_predict  # noqa: E402

__all__ += ["ExpertGate", "GatedAccuracy", "gated_accuracy", "gated_predict"]

from moekit.models.multidomain import BiLevelStep, MultiDomainConfig, MultiDomainModel, domain_task_bce  # noqa: E402  (METHODS.md MT3)

__all__ += ["BiLevelStep", "MultiDomainConfig", "MultiDomainModel", "domain_task_bce"]

from moekit.models.image_quality import gaussian_window, ncc, ncc_loss, ssim, ssim_loss  # noqa: E402  (METHODS.md CV2)
from moekit.models.swin2sr import (  # noqa: E402  (METHODS.md CV2)
                                     Swin2MoSE,
                                     SwinMLP,
                                     SwinV2Block,
                                     WindowAttentionV2,
                                     shifted_window_mask,
                                     swin_param_counts,
)

__all__ += ["gaussian_window", "ncc", "ncc_loss", "ssim", "ssim_loss", "Swin2MoSE", "SwinMLP", "SwinV2Block",
            "WindowAttentionV2", "shifted_window_mask", "swin_param_counts"]

from moekit.models.pathology import (  # noqa: E402  (METHODS.md CV3)
                                     BinaryExpertMoE,
                                     MobileNetTiny,
                                     MulticlassDetector,
                                     SlideResult,
                                     classifier_macs,
                                     decide,
                                     detect_slide,
                                     fit_tile_classifier,
                                     fuse_free_probability,
                                     latency_per_tile,
                                     save_overlays,
                                     tile_grid,
                                     tissue_mask,
                                     tune_threshold,
                                     vit_tile_classifier,
)

__all__ += ["BinaryExpertMoE", "MobileNetTiny", "MulticlassDetector", "SlideResult", "classifier_macs", "decide",
            "detect_slide", "fit_tile_classifier", "fuse_free_probability", "latency_per_tile", "save_overlays",
            "tile_grid", "tissue_mask", "tune_threshold", "vit_tile_classifier"]
