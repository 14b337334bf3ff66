# The refresh strategies vmkeepd takes, for the snap's bash scripts, which cannot import
# REFRESH_STRATEGIES from upgrade/policy.ts: a unit test holds this list to it, and this is the
# only copy. Sourced (installed as bin/vmkeep-strategies.bash) by the configure hook and by
# bin/vmkeepd-launch.
VMKEEP_STRATEGIES=(manual migrate migrate-or-reboot reboot on-guest-shutdown cpr auto)

# For messages: "manual, migrate, ...".
printf -v VMKEEP_STRATEGIES_TEXT '%s, ' "${VMKEEP_STRATEGIES[@]}"
VMKEEP_STRATEGIES_TEXT=${VMKEEP_STRATEGIES_TEXT%, }

# is_strategy NAME: whether vmkeepd takes NAME as a refresh strategy.
is_strategy() {
  local s
  for s in "${VMKEEP_STRATEGIES[@]}"; do
    if [[ $1 == "$s" ]]; then return 0; fi
  done
  return 1
}
