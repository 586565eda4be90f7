# bash completion for git tq: `git-tq <TAB>` and, through git's own completion,
# `git tq <TAB>` (git calls _git_tq). setup.sh installs it as
# ~/.local/share/bash-completion/completions/git-tq, where bash-completion and
# git's completion find it. The candidates come from click (_GIT_TQ_COMPLETE).

_git_tq_candidates() {  # $1: the words, starting with git-tq; $2: the index being completed
    local line type value
    COMPREPLY=()
    while IFS= read -r line; do
        type=${line%%,*}
        value=${line#*,}
        case $type in
            dir) compopt -o dirnames 2>/dev/null; COMPREPLY=(); return ;;
            file) compopt -o default 2>/dev/null; COMPREPLY=(); return ;;
            plain) COMPREPLY+=("$value") ;;
        esac
    done < <(COMP_WORDS="$1" COMP_CWORD="$2" _GIT_TQ_COMPLETE=bash_complete git-tq 2>/dev/null)
}

_git_tq_command() {  # complete -F for `git-tq ...`
    _git_tq_candidates "${COMP_WORDS[*]}" "$COMP_CWORD"
}

_git_tq() {  # for `git tq ...`: git's completion sets $words and $cword
    local -a tq_words=("git-tq" "${words[@]:2}")
    _git_tq_candidates "${tq_words[*]}" "$((cword - 1))"
}

complete -o nosort -F _git_tq_command git-tq 2>/dev/null || complete -F _git_tq_command git-tq
