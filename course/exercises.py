"""
The course's exercises: the project's own functions, blanked in a student copy by course/make.py and
graded by course/grade.py with the project's own reference tests (tests that check values against a
naive loop, a hand computation or another implementation), in the order of the papers.

Each exercise names its file, the function(s) whose body the student writes (`Class.method` for a
method), the tests that grade it, the paper section and a hint. A test is named by its function name
only: grade.py finds it under the student copy's tests/ folder (`def <name>(`), wherever it lives.
`tests` records the file it was in when the list was written, for a reader.

Exercise 1 is the model's attention because every later test that runs a model needs it; a course
about RLHF alone leaves it out (`python course/make.py --out DIR sft_loss gae ...` blanks only the
exercises named). To add an exercise, insert an `Exercise` where it belongs in the papers' order
(before every exercise whose function calls it) and renumber.

Also here, for make.py and the kit's test: `function_body`, where a function's body lies in its
file.
"""
import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    number: int  # "exercise N" in the student copy's NotImplementedError
    name: str  # what grade.py takes on its command line
    file: str  # path in the repository
    functions: tuple  # qualified names of the functions whose bodies are blanked
    task: str  # what to implement: the NotImplementedError's message
    section: str  # where the paper defines it
    hint: str
    tests: tuple  # "test_file.py::test_name": the test functions that grade it

    @property
    def test_names(self):
        return [t.split("::")[-1] for t in self.tests]


EXERCISES = [
    Exercise(
        1, "attention", "model.py", ("CausalSelfAttention.forward",),
        task="causal self-attention over n_head heads, with an optional KV cache",
        section="the GPT-2 architecture (Radford et al. 2019) the paper starts from, section 3.5",
        hint="x (B, T, C) -> (B, T, C). q, k, v from c_attn split into heads (B, nh, T, hs); "
             "with a kv_cache, write k and v at positions past_len..past_len+T and attend over "
             "everything cached so far; F.scaled_dot_product_attention with is_causal=True when "
             "there is no mask and no past, attn_mask otherwise; merge the heads, then c_proj and "
             "resid_dropout.",
        tests=("test_model.py::test_left_padded_logits_equal_unpadded",
               "test_model.py::test_kv_cache_greedy_equals_recomputation_left_padded",
               "test_model.py::test_kv_cache_sampling_equals_recomputation_with_same_seed",
               "test_model.py::test_gpt2_import_matches_transformers_logits_and_greedy")),
    Exercise(
        2, "sft_loss", "sft.py", ("sft_loss",),
        task="the mean NLL of the target tokens where loss_mask is 1",
        section="InstructGPT 3.5, supervised fine-tuning (SFT)",
        hint="Sum -logprobs over the masked tokens of the whole batch and divide by their number: "
             "not a mean of per-sequence means. Guard the division for a mask of zeros.",
        tests=("test_sft.py::test_sft_loss_matches_hand_computation",
               "test_sft.py::test_prompt_targets_and_padding_never_change_the_loss",
               "test_sft.py::test_sft_loss_of_a_single_response_token_is_its_nll",
               "test_sft.py::test_batch_loss_equals_loss_on_full_logits")),
    Exercise(
        3, "preference_loss", "reward.py", ("preference_loss",),
        task="eq. (1): -log sigmoid(r_w - r_l), a prompt's pairs weighted 1/C(K,2)",
        section="InstructGPT 3.5, reward modeling, eq. (1)",
        hint="F.logsigmoid is stable where log(sigmoid(.)) is not. torch.unique(prompt_index, "
             "return_inverse=True, return_counts=True) gives each pair its prompt's number of "
             "pairs; average per prompt, then over prompts.",
        tests=("test_reward.py::test_preference_loss_matches_bce_and_hand_computation",
               "test_reward.py::test_k4_ranking_gives_6_pairs_scaled_by_1_over_c_k_2_once")),
    Exercise(
        4, "score_at_eos", "lib/responses.py", ("last_token_index", "score_sequences"),
        task="the reward model's score: its output at the last real token",
        section="InstructGPT 3.5, reward modeling (a scalar at the EOS)",
        hint="For any padding side, the last real token is the largest position where the mask is "
             "1: multiply the mask by torch.arange(T) made on the mask's device and take the max. "
             "Then gather the head's (B, T) output there.",
        tests=("test_reward.py::test_last_token_index_any_padding_side",
               "test_reward.py::test_last_token_index_stays_on_the_masks_device",
               "test_reward.py::test_score_read_at_eos_whatever_the_padding",
               "test_lib.py::test_score_sequences_reads_the_last_real_token_of_right_padding")),
    Exercise(
        5, "kl_estimate", "ppo.py", ("kl_estimate",),
        task="the per-token KL samples k1, k2 and k3 from x = log pi - log pi_ref",
        section="J. Schulman, \"Approximating KL Divergence\" (2020); Shao et al. 2024 "
                "(DeepSeekMath, GRPO), eq. (4); the KL of InstructGPT eq. (2) is k1",
        hint="x = logprobs - ref_logprobs, elementwise. k1 is x itself (unbiased, can be "
             "negative), k2 is half its square (biased, never negative), k3 is exp(-x) - 1 + x "
             "(unbiased and never negative: e^-x >= 1 - x). Any other name is a ValueError.",
        tests=("test_estimators.py::test_kl_estimate_k1_k2_k3_are_the_formulas_computed_by_hand",
               "test_estimators.py::test_k2_and_k3_are_never_negative_where_k1_is",
               "test_estimators.py::test_k1_and_k3_are_unbiased_for_the_kl_by_enumeration_and_"
               "k2_is_not",
               "test_estimators.py::test_kl_reward_pays_the_estimators_sample_per_token_and_"
               "returns_the_log_ratio")),
    Exercise(
        6, "kl_reward", "ppo.py", ("compute_rewards",),
        task="eq. (2): per-token -beta log(pi_RL / pi_SFT), the score on the last token",
        section="InstructGPT 3.5, RL, eq. (2); Ziegler et al. 2019, section 2",
        hint="The per-token KL is (logprobs - ref_logprobs) * mask. Add each score at its "
             "response's last token (last_token_index) with scatter_add, in the rewards' dtype. "
             "Return (rewards, kl).",
        tests=("test_ppo.py::test_kl_reward_puts_score_on_last_real_token",
               "test_ppo.py::test_kl_reward_takes_scores_of_another_float_dtype",
               "test_optimum.py::test_the_per_token_kl_summed_over_a_response_is_the_sequence_kl")),
    Exercise(
        7, "gae", "ppo.py", ("compute_gae",),
        task="GAE advantages and returns, backwards over each response (GAE eq. 16)",
        section="InstructGPT 3.5 (PPO); Schulman et al. 2016, eq. (16)",
        hint="Loop t from T-1 down to 0 with a running lastgaelam (B,): delta_t = r_t + gamma "
             "V_{t+1} - V_t with V = 0 after the last real token; lastgaelam = delta_t + gamma lam "
             "lastgaelam, zeroed on padding. returns = advantages + values.",
        tests=("test_ppo.py::test_gae_matches_naive_loop",
               "test_ppo.py::test_gae_of_one_token_responses_is_reward_minus_value")),
    Exercise(
        8, "whiten", "ppo.py", ("whiten",),
        task="(x - mean) / std over the masked entries, padding set to 0",
        section="advantage normalisation (Ziegler et al. 2019; Huang et al., The N Implementation "
                "Details of RLHF with PPO)",
        hint="Use global_masked_mean (lib/ddp.py) for the mean and for the population variance, so "
             "that under torchrun every rank whitens with the whole batch's statistics; add eps "
             "inside the square root.",
        tests=("test_ppo.py::test_whiten_gives_masked_mean_zero_variance_one",
               "test_ppo.py::test_whiten_of_equal_values_is_zero_not_nan")),
    Exercise(
        9, "aggregate", "ppo.py", ("aggregate",),
        task="the policy loss's average of its tokens: token_mean or a mean over responses",
        section="Liu et al. 2025 (Dr. GRPO: GRPO's per-response mean against a token sum); "
                "Shao et al. 2024, eq. (3)",
        hint="Multiply by the mask first (padding may hold anything). token_mean: the sum over "
             "the batch / the number of tokens. The per-response modes sum each row over t "
             "(seq_mean_token_mean then divides by the row's own token count), then take the mean "
             "over rows. Clamp the counts to at least 1.",
        tests=("test_estimators.py::test_aggregate_token_mean_and_the_two_per_response_means_by_"
               "hand",)),
    Exercise(
        10, "policy_loss", "ppo.py", ("ppo_policy_loss",),
        task="PPO's clipped surrogate, eq. (7), with clipfrac and approx_kl",
        section="Schulman et al. 2017 (PPO), eqs. (6) and (7); InstructGPT 3.5 and C.4",
        hint="ratio = exp(logprobs - old_logprobs). The loss is the masked mean of "
             "max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)); clipfrac is the share of tokens "
             "where the clipped term is the larger, approx_kl the mean of ratio - 1 - log ratio.",
        tests=("test_ppo.py::test_policy_loss_hand_computed_clipping",
               "test_ppo.py::test_policy_loss_gradient_vanishes_where_clipped",
               "test_ppo.py::test_policy_loss_ratio_is_new_over_old_probability_with_nonzero_"
               "old_logprobs")),
    Exercise(
        11, "value_loss", "ppo.py", ("ppo_value_loss",),
        task="the clipped value loss 0.5 E[max((V - R)^2, (V_clip - R)^2)], clipfrac",
        section="OpenAI baselines' PPO2 and lm-human-preferences (not in the PPO paper)",
        hint="V_clip = old_values + clamp(values - old_values, -eps_v, eps_v); take the larger of "
             "the two squared errors per token, then 0.5 times the masked mean.",
        tests=("test_ppo.py::test_value_loss_clips_as_specified",
               "test_ppo.py::test_value_loss_clips_values_within_cliprange_of_nonzero_old_"
               "values_on_both_sides")),
    Exercise(
        12, "adaptive_kl", "ppo.py", ("adaptive_kl_coef",),
        task="the adaptive KL coefficient of Ziegler et al. 2019, section 2.2",
        section="Ziegler et al. 2019, section 2.2",
        hint="Plain Python floats: clip the proportional error to [-0.2, 0.2] and scale it by "
             "n_steps / horizon.",
        tests=("test_ppo.py::test_adaptive_kl_controller_proportional_and_clipped",)),
    Exercise(
        13, "ptx_loss", "ppo.py", ("lm_loss",),
        task="PPO-ptx's -log pi_RL(x): mean next-token NLL over the real tokens",
        section="InstructGPT 3.5, eq. (2), the pretraining term (PPO-ptx)",
        hint="GPT's forward with targets= returns the targets' log-probabilities (model.py). "
             "Position t predicts token t + 1; a prediction counts where its target is a real "
             "token of the right-padded text (masked_mean).",
        tests=("test_ppo.py::test_lm_loss_is_the_token_mean_nll_of_each_text_alone",)),
    Exercise(
        14, "dpo_loss", "dpo.py", ("dpo_loss",),
        task="DPO eq. (7) with the implicit rewards beta log pi/pi_ref of each side",
        section="Rafailov et al. 2023 (DPO), eq. (7)",
        hint="Each side's implicit reward is beta (log pi - log pi_ref) of that same response; the "
             "loss is -logsigmoid(chosen - rejected), weighted by `weights` if given. Return the "
             "rewards detached.",
        tests=("test_dpo.py::test_dpo_loss_against_a_hand_computation",)),
    Exercise(
        15, "best_of_n_kl", "data/lab/evaluate_lab.py", ("best_of_n_kl",),
        task="KL(best-of-n || base) in closed form",
        section="Stiennon et al. 2020, appendix; Gao et al. 2022, section 2",
        hint="log n - (n - 1) / n: 0 for n = 1, growing like log n.",
        tests=("test_lab.py::test_best_of_n_kl_in_closed_form_against_an_enumeration",
               "test_lab.py::test_best_of_n_curve_keeps_the_highest_rm_sample_of_each_group_by_"
               "hand")),
    Exercise(
        16, "lora_forward", "model.py", ("LoRALinear.forward",),
        task="LoRA's W x + b + (alpha / r) B A x; the base layer alone when disabled",
        section="Hu et al. 2021 (LoRA), eq. (3)",
        hint="super().forward(x) is the frozen layer W x + b. The update runs x through "
             "lora_dropout, then A (r, in), then B (out, r), times self.scale; with self.enabled "
             "False (PPO's reference policy) the layer is the base layer alone.",
        tests=("test_lora.py::test_lora_starts_at_the_base_model_and_merges_to_its_own_outputs",
               "test_lora.py::test_only_adapters_and_unfrozen_heads_get_gradients",
               "test_lora.py::test_a_lora_checkpoint_holds_adapters_and_loads_merged")),
    Exercise(
        17, "wilson_interval", "lib/winrate.py", ("wilson_interval",),
        task="the Wilson score interval of successes / n",
        section="the win rates of InstructGPT section 4 (Figure 1) with a 95% interval",
        hint="The docstring has the formula; clamp to [0, 1] and return (0.0, 1.0) for n = 0.",
        tests=("test_evaluate.py::test_wilson_interval_matches_the_quadratic",
               "test_evaluate.py::test_wilson_interval_known_values_and_edge_cases")),
    Exercise(
        18, "group_advantages", "ppo.py", ("group_advantages",),
        task="RLOO, GRPO and Dr. GRPO advantages within each prompt's K responses",
        section="Ahmadian et al. 2024 (RLOO); Shao et al. 2024 (GRPO), section 4.1.2; "
                "Liu et al. 2025 (Dr. GRPO)",
        hint="returns.view(-1, K) puts each prompt's K contiguous responses in a row. RLOO's "
             "baseline leaves the response out: (row sum - R_i) / (K - 1). Dr. GRPO subtracts the "
             "row mean; GRPO then divides by the row's unbiased std (torch.std's default) + 1e-6. "
             "Flatten back to (B,).",
        tests=("test_estimators.py::test_group_advantages_match_a_naive_loop_over_contiguous_"
               "groups",
               "test_estimators.py::test_group_advantages_differ_from_the_planted_mistakes",
               "test_estimators.py::test_grpo_of_a_group_of_equal_returns_is_zero_not_nan")),
    Exercise(
        19, "advantages", "ppo.py", ("compute_advantages",),
        task="step 4 by cfg.advantage_estimator: GAE, REINFORCE++ or a group estimator",
        section="Hu et al. 2025 (REINFORCE++); Ahmadian et al. 2024; Shao et al. 2024; "
                "InstructGPT C.4 (GAE)",
        hint="gae: compute_gae, then whiten the advantages (the returns are the raw ones). "
             "reinforce_pp: the returns-to-go are compute_gae with zero values and lambda 1, "
             "whitened; no returns. rloo, grpo, dr_grpo: group_advantages of each row's summed "
             "reward, broadcast to its tokens and masked; no returns.",
        tests=("test_estimators.py::test_reinforce_pp_advantages_are_whitened_returns_to_go_of_a_"
               "naive_loop",
               "test_estimators.py::test_group_estimators_give_every_response_token_its_responses_"
               "advantage",
               "test_estimators.py::test_gae_advantages_are_compute_gae_whitened_and_its_returns")),
]

BY_NAME = {e.name: e for e in EXERCISES}


def find(name):
    """The exercise called `name` (or numbered `name`), or None."""
    if name.isdigit():
        return next((e for e in EXERCISES if e.number == int(name)), None)
    return BY_NAME.get(name)


def function_body(source, qualname):
    """Where the body of function `qualname` ("f" or "Class.f", at the top of the module) lies in
    `source`: (node, first, last), 1-based line numbers of its statements after the docstring."""
    scope, node = ast.parse(source).body, None
    for part in qualname.split("."):
        node = next((n for n in scope if getattr(n, "name", None) == part), None)
        if node is None:
            raise LookupError(f"no {qualname} in this file")
        scope = getattr(node, "body", [])
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise LookupError(f"{qualname} is not a function")
    body = node.body[1:] if docstring_node(node) is not None else node.body
    if not body:
        raise LookupError(f"{qualname} has nothing but a docstring")
    return node, body[0].lineno, node.end_lineno


def docstring_node(node):
    first = node.body[0]
    is_str = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return first if is_str and isinstance(first.value.value, str) else None
