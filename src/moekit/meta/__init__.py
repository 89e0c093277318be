"""Meta-learning methods with experts (METHODS.md §8): neural processes with expert latents
(MoE-NPs, M4) beside the latent NP they extend, a mixture of meta-learners with a gate that
reads the support set (MxML, M1), and an online mixture of MAML initialisations with a
Chinese-restaurant-process prior (M2), and Meta-DMoE, frozen domain experts distilled into a
student by label-free test-time adaptation through a transformer aggregator (M3), and hierarchical
expert networks, a support-set selector over expert learners trained with information costs
(bounded rationality, M5). Studies that
use them live in ``projects/``."""
from moekit.meta.dmoe import ExpertAggregator, MetaDMoE, meta_train_dmoe
from moekit.meta.hierarchical import (
                                      HierarchicalExpertNetwork,
                                      InformationTerms,
                                      blahut_arimoto,
                                      conditional_mutual_information,
                                      information_objective,
                                      mutual_information,
                                      optimal_selector,
                                      train_hierarchical_experts,
)
from moekit.meta.mxml import (
                              DomainEpisodes,
                              MixtureOfMetaLearners,
                              SupportGate,
                              TaskDomain,
                              episode_log_probs,
                              evaluate_domain,
                              meta_train_domains,
                              train_gate,
)
from moekit.meta.neural_process import LatentNP, MoENP, gaussian_kl, train_neural_process
from moekit.meta.online_maml import OnlineMAMLMixture

__all__ = ["LatentNP", "MoENP", "gaussian_kl", "train_neural_process",
           "TaskDomain", "DomainEpisodes", "SupportGate", "MixtureOfMetaLearners", "episode_log_probs",
           "meta_train_domains", "train_gate", "evaluate_domain", "OnlineMAMLMixture",
           "ExpertAggregator", "MetaDMoE", "meta_train_dmoe",
           "HierarchicalExpertNetwork", "InformationTerms", "mutual_information", "conditional_mutual_information",
           "information_objective", "optimal_selector", "blahut_arimoto", "train_hierarchical_experts"]
