#!/usr/bin/env bash
# Install git tq for this user (no root): its own virtualenv, `git-tq` on PATH,
# the man page, and shell completion later. Safe to run again.
#
#   bash setup.sh              install (or update) from this checkout
#   bash setup.sh --uninstall  remove everything this script installed, nothing else
#   bash setup.sh --test       make ./.venv with the test tools and run the whole suite
#
# TQ_SETUP_EXTRAS (default: web) names the extras installed with it; `web` is what
# `git tq report` and `git tq serve` need. TQ_SETUP_EXTRAS= installs the core only
# (a machine that only runs jobs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
prefix="$data_home/git-tq"
venv="$prefix/venv"
bin_dir="$HOME/.local/bin"
man_dir="$data_home/man/man1"
bash_dir="$data_home/bash-completion/completions"
zsh_dir="$data_home/zsh/site-functions"
fish_dir="${XDG_CONFIG_HOME:-$HOME/.config}/fish/completions"
manifest="$prefix/installed-files"
python=${PYTHON:-python3}

say() { printf 'setup.sh: %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

make_venv() {  # make_venv DIR: a virtualenv, with a fallback where python3-venv is missing
    local dir=$1
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import sys' 2>/dev/null; then
        return
    fi
    if ! "$python" -m venv "$dir" 2>/dev/null; then
        rm -rf "$dir"
        say "python3 -m venv is unavailable here; using virtualenv instead"
        "$python" -m pip install --user --quiet virtualenv || die "cannot install virtualenv"
        "$python" -m virtualenv --quiet "$dir" || die "cannot create a virtualenv in $dir"
    fi
}

LAUNCHER_MARK="git tq's launcher, written by setup.sh"

write_launcher() {  # write_launcher PATH: `git-tq` for PATH, running the venv's python
    # Not a link to pip's script: that one imports `re` before anything else, and
    # `git tq run` starts its first git process sooner without it.
    local path=$1 tmp="$1.tmp.$$"
    printf '#!%s\n# %s (bash setup.sh --uninstall removes it)\nimport sys\n\nfrom git_tq.entry import main\n\nsys.exit(main())\n' \
        "$venv/bin/python" "$LAUNCHER_MARK" > "$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$path"
}

install() {
    command -v git >/dev/null || die "git is not installed"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
        || die "git tq needs Python 3.9 or newer ($python is older)"
    # Remember which folders we create, so --uninstall removes them (if empty) and no others.
    local created=()
    for dir in "$prefix" "$bin_dir" "$man_dir" "$(dirname "$man_dir")" "$bash_dir" \
               "$(dirname "$bash_dir")" "$zsh_dir" "$(dirname "$zsh_dir")" "$fish_dir" \
               "$(dirname "$fish_dir")"; do
        [ -d "$dir" ] || created+=("$dir")
    done
    if [ -f "$manifest" ]; then  # a re-install keeps the folders the first one made
        while IFS= read -r line; do
            case "$line" in dir:*) created+=("${line#dir:}") ;; esac
        done < "$manifest"
    fi
    mkdir -p "$prefix" "$bin_dir" "$man_dir" "$bash_dir" "$zsh_dir" "$fish_dir"
    make_venv "$venv"
    say "installing git tq into $venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # The web extra: Jinja2, plotly's JavaScript, Starlette, uvicorn (git tq report, serve).
    local extras=${TQ_SETUP_EXTRAS-web}
    "$venv/bin/python" -m pip install --quiet "$here${extras:+[$extras]}" \
        || die "pip install failed"
    # nvidia-ml-py lets git tq find GPUs through NVML; optional where no driver exists.
    if [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install --quiet "nvidia-ml-py>=12" \
            || say "warning: nvidia-ml-py did not install; declare GPUs with git config tq.gpus"
    fi
    write_launcher "$bin_dir/git-tq"
    cp "$here/man/git-tq.1" "$man_dir/git-tq.1"
    cp "$here/git_tq/completion/git-tq.bash" "$bash_dir/git-tq"
    cp "$here/git_tq/completion/_git-tq" "$zsh_dir/_git-tq"
    cp "$here/git_tq/completion/git-tq.fish" "$fish_dir/git-tq.fish"
    {
        printf '%s\n' "$bin_dir/git-tq" "$man_dir/git-tq.1" "$venv" "$bash_dir/git-tq" \
            "$zsh_dir/_git-tq" "$fish_dir/git-tq.fish"
        for dir in "${created[@]+"${created[@]}"}"; do printf 'dir:%s\n' "$dir"; done
    } | sort -u > "$manifest.tmp" && mv "$manifest.tmp" "$manifest"
    say "installed: $bin_dir/git-tq, $man_dir/git-tq.1, completion for bash, zsh and fish"
    say "zsh: add $zsh_dir to fpath (fpath+=($zsh_dir) before compinit) for completion"
    case ":$PATH:" in
        *":$bin_dir:"*) ;;
        *) say "$bin_dir is not on your PATH; add this line to ~/.bashrc (or ~/.zshrc):"
           printf '    export PATH="%s:$PATH"\n' "$bin_dir" ;;
    esac
}

uninstall() {
    if [ ! -f "$manifest" ]; then
        say "nothing to uninstall (no $manifest)"
        return
    fi
    while IFS= read -r path; do
        case "$path" in
            "$bin_dir/git-tq")  # only our own launcher (or link), never someone else's git-tq
                if [ -L "$path" ] && [ "$(readlink "$path")" = "$venv/bin/git-tq" ]; then
                    rm -f "$path"
                elif [ -f "$path" ] && [ ! -L "$path" ] && grep -qF "$LAUNCHER_MARK" "$path"; then
                    rm -f "$path"
                fi ;;
            "$man_dir/git-tq.1"|"$bash_dir/git-tq"|"$zsh_dir/_git-tq"|"$fish_dir/git-tq.fish")
                rm -f "$path" ;;
            "$venv") rm -rf "$venv" ;;
        esac
    done < "$manifest"
    local dirs
    dirs=$(grep '^dir:' "$manifest" | cut -c5- | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
    rm -f "$manifest"
    while IFS= read -r dir; do  # deepest first; only folders we made, only if now empty
        [ -n "$dir" ] && rmdir "$dir" 2>/dev/null || true
    done <<< "$dirs"
    say "uninstalled (job records in your repositories and the tq home are kept)"
}

find_chromium() {  # the browser the tests drive (Debian's chromium; no download of its own)
    local name
    for name in "${TQ_CHROMIUM:-}" chromium chromium-browser google-chrome; do
        [ -n "$name" ] && command -v "$name" && return 0
    done
    return 1
}

ensure_chromium() {  # as the README tells developers: apt-get install chromium
    find_chromium >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing chromium (apt-get) for the browser tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
            || say "warning: chromium did not install: the browser tests will fail under CI"
    else
        say "no chromium: the browser tests will be skipped (sudo apt-get install chromium)"
    fi
}

run_tests() {
    cd "$here"
    make_venv "$here/.venv"
    "$here/.venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # compat: a plain path in a .pth file, not setuptools' import hook, which imports
    # pathlib at every interpreter start (~13 ms of each of the suite's git-tq runs).
    # setuptools calls the mode transitional: where it is gone, the default one is used.
    "$here/.venv/bin/python" -m pip install --quiet -e "$here[test]" \
        --config-settings editable_mode=compat 2>/dev/null \
        || "$here/.venv/bin/python" -m pip install --quiet -e "$here[test]" \
        || die "pip install failed"
    export PATH="$here/.venv/bin:$PATH"
    ensure_chromium
    # Byte-compile the package now: where PYTHONDONTWRITEBYTECODE is set, every git-tq the
    # suite starts would otherwise compile it again (0.34 s a start instead of 0.15 s).
    python -m compileall -q "$here/git_tq" >/dev/null || die "compileall failed"
    say "ruff"; ruff check git_tq tests bench
    say "mypy"; mypy
    # --dist loadgroup: the tests of the one Slurm test cluster run on one worker.
    say "pytest"; python -m pytest -p no:cacheprovider -n 2 --dist loadgroup "$@"
}

case "${1:-}" in
    "") install ;;
    --uninstall) uninstall ;;
    --test) shift; run_tests "$@" ;;
    -h|--help) sed -n '2,8p' "$0" ;;
    *) die "unknown option $1 (see bash setup.sh --help)" ;;
esac
