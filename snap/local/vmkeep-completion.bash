# bash completion of the vmkeep app (apps.vmkeep.completer in snapcraft.yaml, installed as
# bin/vmkeep-completion.bash). snapd sources it inside the snap's environment when the user
# presses TAB after `vmkeep`. Commands and options come from the CLI itself (yargs'
# --get-yargs-completions); after a command that takes a VM name, the names come from vmkeepd
# (`vmkeep list --json`: the control socket is root's, so other users get no names).

# Commands whose first argument is a VM name.
_VMKEEP_NAME_COMMANDS=" start stop delete status logs qmp console refresh "

_vmkeep_cli() {
  "$SNAP/bin/node" "$SNAP/lib/vmkeep/dist/cli/main.js" "$@" 2>/dev/null
}

_vmkeep_vm_names() {
  _vmkeep_cli list --json | "$SNAP/bin/node" -e '
    let text = "";
    process.stdin.on("data", (d) => (text += d)).on("end", () => {
      try { for (const vm of JSON.parse(text)) if (typeof vm.name === "string") console.log(vm.name); } catch {}
    });' 2>/dev/null
}

_vmkeep() {
  local cur=${COMP_WORDS[COMP_CWORD]} words IFS=$'\n'
  COMPREPLY=()
  if ((COMP_CWORD == 2)) && [[ $_VMKEEP_NAME_COMMANDS == *" ${COMP_WORDS[1]} "* && $cur != -* ]]; then
    words=$(_vmkeep_vm_names)
  else
    words=$(_vmkeep_cli --get-yargs-completions "${COMP_WORDS[@]:1:COMP_CWORD}")
  fi
  # shellcheck disable=SC2207 # one completion per line (IFS is a newline)
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}

complete -F _vmkeep vmkeep
