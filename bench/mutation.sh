#!/usr/bin/env bash
# Mutation testing of the math and the stage loops (PPO, reward model, SFT, and the code they share
# in lib/responses.py and lib/ddp.py) with mutmut; NOT part of CI (.ci/run).
#
#   pip install -r requirements-dev.txt   # mutmut, pinned
#   bash bench/mutation.sh [max_children]  # 2 workers by default, at nice 10; ~1000 mutants
#
# Each mutant of the functions below runs the fast tests that reach it (pyproject.toml
# [tool.mutmut]: no torchrun, no train(), no fixture that trains a model first), -x. Prints the
# counts (killed / survived / timeout / total) per function and in all, then each survivor with its
# diff; the full output is kept in mutants/report.txt. Work files: ./mutants (git-ignored), made
# afresh on each run. One mutant again: python bench/mutmut_cli.py run NAME
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
FUNCTIONS=(
  lib.responses.response_mask_from_eos lib.responses.sample_responses lib.responses.sample_and_score
  lib.responses.sequence_kl lib.responses.policy_logprobs lib.responses.score_responses
  lib.responses.last_token_index lib.responses.score_sequences lib.ddp.step_total
  ppo.compute_rewards ppo.compute_gae ppo.whiten ppo.ppo_policy_loss ppo.ppo_value_loss
  ppo.explained_variance ppo.adaptive_kl_coef ppo.lm_loss ppo.critic_values ppo.split_ptx
  ppo.n_predicted
  ppo.rollout ppo.minibatch ppo.ppo_update
  reward.preference_loss reward.accumulate_gradients
  sft.sft_loss sft.collate sft.accumulate_gradients
)
# mutmut's name of a mutant: module.x_function__mutmut_N (ppo.x_whiten__mutmut_1), hence the
# split of each function above at its last dot
patterns=()
for f in "${FUNCTIONS[@]}"; do patterns+=("${f%.*}.x_${f##*.}__mutmut_*"); done
# the tests run in ./mutants, where tests/conftest.py would not find the tokenizer copy in ../shared
# next to the repository
if [ -d ../shared/tiktoken ]; then
  export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd ../shared/tiktoken && pwd)}
fi

rm -rf mutants
mkdir mutants
start=$(date +%s)
if ! nice -n 10 "$PYTHON" bench/mutmut_cli.py run --max-children "${1:-2}" "${patterns[@]}" \
    > mutants/run.log 2>&1; then
  tail -c 3000 mutants/run.log
  echo "mutmut run failed (whole log: mutants/run.log)"
  exit 1
fi
"$PYTHON" bench/mutmut_cli.py report "${patterns[@]}" > mutants/report.txt
version=$("$PYTHON" -c 'import mutmut; print(mutmut.__version__)')
elapsed=$(( $(date +%s) - start ))
echo "mutmut $version: ${#FUNCTIONS[@]} functions, ${elapsed}s" >> mutants/report.txt
cat mutants/report.txt
