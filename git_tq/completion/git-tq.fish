# fish completion for git tq: `git-tq <TAB>` and `git tq <TAB>`. setup.sh
# installs it as ~/.config/fish/completions/git-tq.fish (and git-tq's for git).

function __git_tq_complete
    set -l line (commandline -cp)
    set line (string replace -r '^\s*git\s+tq\b' 'git-tq' -- $line)
    env COMP_WORDS="$line" COMP_CWORD=(commandline -t) _GIT_TQ_COMPLETE=fish_complete git-tq 2>/dev/null | while read -l item
        set -l parts (string split -m 1 ',' -- $item)
        if test "$parts[1]" = plain
            echo $parts[2]
        end
    end
end

complete -c git-tq -f -a '(__git_tq_complete)'
complete -c git -n '__fish_seen_subcommand_from tq' -f -a '(__git_tq_complete)'
