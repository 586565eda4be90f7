"""The interactive console (`git tq` on a terminal): a thin modal layer over the CLI.

Three modes — Home, Queue, Logs — each with a few words of its own; every
action runs the very `git tq` command it stands for (in-process, through the
same click commands), so the console holds no second implementation.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from typing import Callable, Optional

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, InMemoryHistory

from git_tq import service
from git_tq.errors import TqError
from git_tq.home import ensure_private_dir, open_private
from git_tq.output import STATE_STYLES
from git_tq.safetext import visible

RUN_OPTIONS_WITH_VALUE = {"-p", "--priority", "-g", "--grace", "-t", "--tag", "-e", "--env",
                          "--gpu", "--gpus", "--signal", "--sweep", "--sweep-name", "--time",
                          "--retry"}
RUN_FLAGS = {"--cpu", "--sh", "-q", "--quiet"}
TRAILING = {"-p", "-g", "-t", "-e"}
GPU_CHOICES = {"--gpu", "--gpus", "--cpu"}  # a job's own choice: the selected queue yields

HELP: dict[str, dict[str, str]] = {
    "home": {
        "use IDS": "select the GPU queue new jobs go to (use 0, use 0,1; `use any` clears it;"
                   " --gpu/--gpus/--cpu on a line override it)",
        "start / stop": "start or stop the daemon",
        "pause / resume": "hold the selected queue (pause IDS, pause all: those): nothing "
                          "new starts there, running jobs go on; resume releases it",
        "st": "every queue: running and waiting jobs (git tq st)",
        "q": "Queue mode: the waiting jobs of the selected queue",
        "hist [FOLDER]": "Logs mode: the log tree",
        "compare JOBS": "one table of jobs side by side: code, run time, metrics "
                        "(compare 3-6, compare SWEEP)",
        "wait JOBS": "wait until the jobs have ended (Ctrl-C stops waiting)",
        "env NAME": "the environment for jobs submitted from here (env - clears it)",
        "cd DIR / pwd": "change or show the directory jobs are submitted from",
        "man / help CMD": "this list / help on one command",
        "exit": "leave (Ctrl-D too)",
        "anything else": "submitted as a job: [run options] COMMAND [-p N -g S -t TAG -e ENV]",
    },
    "queue": {
        "ls": "list the waiting jobs again",
        "rm N...": "remove waiting jobs by their number here (rm 1 3, rm 1,3)",
        "p N PRI": "set the priority of waiting job N (p 3 10); may preempt a running job",
        "g N SECONDS": "set the grace period of waiting job N",
        "t N TAG": "set the tag of waiting job N ('' removes it)",
        "edit N OPTIONS": "any `git tq edit` options for waiting job N (edit 2 --after 5)",
        "purge": "remove every waiting job of the selected queue (asks first)",
        "back": "back to Home",
    },
    "logs": {
        "ls": "show the current folder again",
        "view N [-f]": "show log N (-f follows it; Ctrl-C stops following)",
        "plot N... [OPTIONS]": "metric curves of the jobs of logs N... (plot 2 3 -m loss; "
                               "git tq plot's options)",
        "note N TEXT": "annotate the job of log N",
        "catg N FOLDER": "file log N under FOLDER",
        "lcd FOLDER": "go to a folder of the log tree (.. goes up; never above the root)",
        "rm N": "delete log N (asks first; the job record stays)",
        "back": "back to Home",
    },
}


def run_cli(args: Sequence[str]) -> int:
    """Run one `git tq` command in this process; its exit status."""
    from git_tq.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def pt_style(style: Optional[str]) -> str:
    """A rich style (output.STATE_STYLES: "bold green") as prompt_toolkit writes it."""
    words = []
    for word in (style or "").split():
        if word in ("bold", "italic", "underline", "reverse"):
            words.append(word)
        elif word == "dim":
            words.append("ansibrightblack")
        else:
            words.append(f"ansi{word}")
    return " ".join(words)


def split_submission(words: list[str]) -> list[str]:
    """`git tq run` arguments for a console line: leading run options stay in front,
    trailing `-p N -g S -t TAG -e ENV` pairs move there too (unless after `--`)."""
    options, command = split_options(words)
    return [*options, "--", *command]


def split_options(words: list[str]) -> tuple[list[str], list[str]]:
    """A console line's run options (leading ones, then trailing pairs) and its command."""
    head: list[str] = []
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "--":
        head.append(words[i])
        if words[i] in RUN_OPTIONS_WITH_VALUE and i + 1 < len(words):
            head.append(words[i + 1])
            i += 1
        i += 1
    rest = words[i:]
    if rest[:1] == ["--"]:
        return head, rest[1:]
    tail: list[str] = []
    while len(rest) >= 3 and rest[-2] in TRAILING:
        tail = rest[-2:] + tail
        rest = rest[:-2]
    return head + tail, rest


def option_names(options: list[str]) -> list[str]:
    """The names among run options (`--gpus=2` gives --gpus), values skipped."""
    names, i = [], 0
    while i < len(options):
        name = options[i].split("=", 1)[0]
        names.append(name)
        i += 2 if options[i] in RUN_OPTIONS_WITH_VALUE else 1
    return names


class Console:
    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.mode = "home"
        self.folder = ""  # Logs mode: relative to the log root
        self.gpus: Optional[str] = None  # the selected GPU queue
        self.env: Optional[str] = None
        # Everything shown goes through safetext: job fields and log names may hold
        # escape sequences (records can come from a teammate's fetched refs).
        self.out: Callable[[str], None] = lambda text: out(visible(text, newlines=True))
        self.plain = out
        # Colour as the CLI has it (rich styles, as prompt_toolkit's), unless NO_COLOR.
        self.color = not os.environ.get("NO_COLOR")
        self.numbers: dict[int, int] = {}  # number shown in Queue/Logs mode -> job id
        self.ask: Callable[[str], str] = input

    def styled(self, parts: Sequence[tuple[str, str]]) -> FormattedText:
        """(rich style, text) fragments as prompt_toolkit's, every text made safe; the
        styles dropped under NO_COLOR."""
        return FormattedText([(pt_style(style) if self.color else "", visible(text))
                              for style, text in parts])

    def show(self, *parts: tuple[str, str]) -> None:
        """Print one line of (rich style, text) fragments."""
        if self.color:
            print_formatted_text(self.styled(parts))
        else:
            self.plain("".join(visible(text) for _, text in parts))

    # --- the prompt -----------------------------------------------------------

    def prompt(self) -> FormattedText:
        env = (os.path.basename(self.env) if self.env and "/" in self.env else self.env) or \
            os.environ.get("CONDA_DEFAULT_ENV") or \
            os.path.basename(os.environ.get("VIRTUAL_ENV", "")) or ""
        cwd = os.getcwd()
        home = os.path.expanduser("~")
        if cwd == home or cwd.startswith(home + os.sep):
            cwd = "~" + cwd[len(home):]
        try:
            status = service.daemon_status(service.home_for())
        except (TqError, OSError):
            status = None
        held = self.selected_paused(status)
        parts = [("cyan", f"({env}) ")] if env else []
        parts += [("bold", cwd), ("", " (tq:"), ("yellow", self.gpus or "any"), ("", "|"),
                  ("bold red", "OFF") if status is None else ("bold yellow", "PAUSED")
                  if held else ("bold green", "ON"), ("", ")")]
        if self.mode == "queue":
            parts.append(("bold magenta", " [QUEUE]"))
        elif self.mode == "logs":
            parts.append(("bold magenta", f" [LOGS:{self.folder or '/'}]"))
        return self.styled([*parts, ("", " > ")])

    def selected_paused(self, status: Optional[dict[str, object]]) -> bool:
        """Whether `git tq pause` holds the selected queue (the whole queue for `any`)."""
        paused = (status or {}).get("paused")
        if not isinstance(paused, dict) or not paused.get("paused"):
            return False
        if paused.get("everything"):
            return True
        gpus = paused.get("gpus")
        chosen = {int(g) for g in self.gpus.split(",")} if self.gpus else set()
        return isinstance(gpus, list) and bool(chosen & set(gpus))

    # --- dispatch -----------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Carry out one line; False when the console should close."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.out(f"git tq: {exc}")
            return True
        if not words:
            return True
        cmd, args = words[0], words[1:]
        if cmd in ("exit", "quit"):
            return False
        if cmd in ("man", "help"):
            self.help(args)
            return True
        handler = getattr(self, f"{self.mode}_{cmd}", None)
        if handler is not None:
            result = handler(args)
            return result is not False
        if self.mode == "home":
            self.submit(words)
        else:
            self.out(f"git tq: {cmd!r} is not a {self.mode.title()} command (man lists them; "
                     "back returns Home)")
        return True

    def help(self, args: list[str]) -> None:
        if args:
            name = args[0]
            for mode, commands in HELP.items():
                for usage, text in commands.items():
                    if usage.split()[0] == name or usage.startswith(name + " "):
                        self.out(f"{usage:<16} ({mode}) {text}")
                        return
            run_cli([name, "-h"])
            return
        for mode, commands in HELP.items():
            self.out(f"{mode.title()} mode:")
            for usage, text in commands.items():
                self.out(f"  {usage:<16} {text}")

    # --- Home ------------------------------------------------------------------

    def submit(self, words: list[str]) -> None:
        """Submit a line as a job: to the selected queue and environment, unless the line
        chooses its own with run options (the command's own words never count: in
        `python a.py --gpus 2`, --gpus is a.py's)."""
        options, command = split_options(words)
        names = option_names(options)
        extra: list[str] = []
        chosen = [n for n in names if n in GPU_CHOICES]
        if self.gpus and chosen:
            self.out(f"note: {' '.join(chosen)} given: this job does not go to the selected "
                     f"queue {self.gpus}")
        elif self.gpus:
            extra += ["--gpu", self.gpus]
        if self.env and "-e" not in names and "--env" not in names:
            extra += ["-e", self.env]
        run_cli(["run", *extra, *options, "--", *command])

    def home_use(self, args: list[str]) -> None:
        if not args:
            self.out(f"queue: {self.gpus or 'any'}")
            return
        choice = ",".join(args)
        if choice in ("any", "-", "none"):
            self.gpus = None
        else:  # refused as `run --gpu` refuses it (a GPU this machine lacks): nothing changes
            self.gpus = ",".join(map(str, service.gpu_queue(service.Context.open(), choice)))
        self.out(f"new jobs go to GPU queue {self.gpus or 'any'}")

    def home_start(self, args: list[str]) -> None:
        run_cli(["start"])

    def home_stop(self, args: list[str]) -> None:
        run_cli(["stop"])

    def home_pause(self, args: list[str]) -> None:
        run_cli(["pause", *self.queue_args(args)])

    def home_resume(self, args: list[str]) -> None:
        run_cli(["resume", *self.queue_args(args)])

    def queue_args(self, args: list[str]) -> list[str]:
        """The queue `pause`/`resume` act on: the selected one unless named (`pause 0,1`,
        `pause all`, or the command's own options)."""
        if not args:
            return ["--gpu", self.gpus] if self.gpus else []
        if args == ["all"]:
            return []
        return args if args[0].startswith("-") else ["--gpu", ",".join(args)]

    def home_st(self, args: list[str]) -> None:
        run_cli(["ls", *args])

    def home_ls(self, args: list[str]) -> None:
        run_cli(["ls", *args])

    def home_compare(self, args: list[str]) -> None:
        run_cli(["compare", *args])

    def home_wait(self, args: list[str]) -> None:
        run_cli(["wait", *args])

    def home_env(self, args: list[str]) -> None:
        if not args or args[0] == "-":
            self.env = None
        else:  # a path is checked as `run -e` checks it; an unknown conda name warned about
            self.env, warning = service.check_env(args[0], os.getcwd())
            if warning:
                self.out(f"git tq: warning: {warning}")
        self.out(f"jobs from here run in {self.env or 'the submitting environment'}")

    def home_cd(self, args: list[str]) -> None:
        target = os.path.expanduser(args[0] if args else "~")
        try:
            os.chdir(target)
        except OSError as exc:
            self.out(f"git tq: cd: {exc.strerror}: {target}")

    def home_pwd(self, args: list[str]) -> None:
        self.out(os.getcwd())

    def home_q(self, args: list[str]) -> None:
        self.mode = "queue"
        self.queue_ls(args)

    def home_hist(self, args: list[str]) -> None:
        new = self.folder_after("", args[0] if args else ".")
        tree = service.log_tree(service.Context.open(), new or None)  # refused: no change
        self.mode, self.folder = "logs", tree.folder
        self.show_tree(tree)

    def home_rm(self, args: list[str]) -> None:
        self.out("git tq: rm works in Queue mode (q) or Logs mode (hist)")

    def home_back(self, args: list[str]) -> bool:
        return self.ask("Leave the git tq console? [y/N] ").strip().lower() not in ("y", "yes")

    # --- Queue ----------------------------------------------------------------------

    def queue_ls(self, args: list[str]) -> None:
        """The selected queue's waiting jobs (service.in_gpu_queue: those asking for
        exactly its GPUs), numbered afresh: every change here lists them again."""
        ctx = service.Context.open()
        wanted = tuple(int(g) for g in self.gpus.split(",")) if self.gpus else None
        pending = service.pending_jobs(ctx, wanted)
        waits = service.waiting_reasons(ctx, pending)
        self.numbers = {n: j.id for n, j in enumerate(pending, 1)}
        self.show(("bold", f"waiting in queue {self.gpus or 'any'}: {len(pending)}"))
        if pending:
            self.show(("bold", f"{'N':>3}  {'ID':>5}  {'PRI':>4}  {'GRACE':>5}  "
                               f"{'TAG':<12} COMMAND"))
        for n, j in enumerate(pending, 1):
            reason = waits.get(j.id, ((), None))[1]
            self.show(("yellow", f"{n:>3}"), ("", f"  {j.id:>5}  {j.spec.priority:>4}  "
                                                  f"{j.spec.grace:>5}  "),
                      ("blue", f"{(j.spec.tag or '')[:12]:<12}"),
                      ("", f" {j.spec.command_line()}"),
                      ("dim", f"  ({reason})" if reason else ""))

    def _ids(self, args: list[str]) -> Optional[list[str]]:
        ids = []
        for token in service.parse_job_tokens(args):
            if not (token.isascii() and token.isdigit()) or int(token) not in self.numbers:
                self.out(f"git tq: no number {token} here (ls shows them)")
                return None
            ids.append(str(self.numbers[int(token)]))
        return ids

    def queue_rm(self, args: list[str]) -> None:
        ids = self._ids(args)
        if ids:
            run_cli(["rm", *ids])
            self.queue_ls([])

    def queue_edit(self, args: list[str]) -> None:
        """`edit N OPTIONS`: `git tq edit` of waiting job N; `p N PRI`, `g N S` and
        `t N TAG` are its short forms."""
        if len(args) < 2:
            self.out("git tq: give a job's number and what to change (edit 3 -p 10)")
            return
        ids = self._ids(args[:1])
        if ids:
            run_cli(["edit", *ids, *args[1:]])
            self.queue_ls([])

    def _quick_edit(self, option: str, args: list[str]) -> None:
        if len(args) != 2:
            self.out(f"git tq: give a job's number and the new value ({option} 3 10 sets "
                     "job 3's)")
            return
        self.queue_edit([args[0], option, args[1]])

    def queue_p(self, args: list[str]) -> None:
        self._quick_edit("-p", args)

    def queue_g(self, args: list[str]) -> None:
        self._quick_edit("-g", args)

    def queue_t(self, args: list[str]) -> None:
        self._quick_edit("-t", args)

    def queue_purge(self, args: list[str]) -> None:
        """Purge the selected queue only (all of them when none is selected)."""
        run_cli(["purge", *(["--gpu", self.gpus] if self.gpus else [])])
        self.queue_ls([])

    def queue_back(self, args: list[str]) -> None:
        self.mode = "home"

    # --- Logs ----------------------------------------------------------------------------

    def logs_ls(self, args: list[str]) -> None:
        self.show_tree(service.log_tree(service.Context.open(), self.folder or None))

    def show_tree(self, tree: service.LogFolder) -> None:
        """A folder of the log tree, numbered afresh (as `git tq hist` shows it)."""
        self.numbers = {e.number: e.view.job.id for e in tree.entries}
        self.show(("bold", f"logs/{tree.folder}"), ("dim", "   <- you are here"))
        for name in tree.folders:
            self.show(("blue", f"  {name}/"))
        for e in tree.entries:
            j = e.view.job
            self.show(("", f"  {e.number:>3}. #{j.id:<5} "),
                      (STATE_STYLES[j.state.value], f"{j.state.value:<9}"),
                      ("", f" {j.spec.submitted_at[:16]}"),
                      ("blue", f" [{j.spec.tag}]" if j.spec.tag else ""),
                      ("", f" {os.path.basename(e.path)}"),
                      ("bold cyan", f"  — {e.view.note}" if e.view.note else ""))

    def folder_after(self, folder: str, target: str) -> str:
        """The log folder `lcd target` leads to from `folder` (relative to the log root)."""
        if target == "..":
            return "/".join(folder.split("/")[:-1]) if folder else ""
        if target in (".", "/"):
            return folder if target == "." else ""
        return f"{folder}/{target}".strip("/") if not target.startswith("/") \
            else target.strip("/")

    def logs_lcd(self, args: list[str]) -> None:
        new = self.folder_after(self.folder, args[0] if args else ".")
        # Refuses a folder outside the log root, or one that does not exist: before
        # anything changes, so a refused lcd leaves the console where it was.
        tree = service.log_tree(service.Context.open(), new or None)
        self.folder = tree.folder
        self.show_tree(tree)

    def logs_view(self, args: list[str]) -> None:
        follow = "-f" in args
        ids = self._ids([a for a in args if a != "-f"][:1])
        if ids:
            run_cli(["view", *(["-f"] if follow else []), ids[0]])

    def logs_plot(self, args: list[str]) -> None:
        cut = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
        numbers, options = args[:cut], args[cut:]
        ids = self._ids(numbers) if numbers else None
        if ids:
            run_cli(["plot", *ids, *options])
        elif not numbers:
            self.out("git tq: plot N... [-m METRICS] (numbers as ls shows them)")

    def logs_note(self, args: list[str]) -> None:
        ids = self._ids(args[:1])
        if ids:
            run_cli(["note", ids[0], *args[1:]])

    def logs_catg(self, args: list[str]) -> None:
        ids = self._ids(args[:1])
        if ids and len(args) == 2:
            run_cli(["catg", ids[0], args[1]])
            self.logs_ls([])
        elif ids:
            self.out("git tq: catg N FOLDER")

    def logs_rm(self, args: list[str]) -> None:
        ids = self._ids(args[:1])
        if ids:
            answer = self.ask(f"Delete log {args[0]} (job {ids[0]})? The record stays. [y/N] ")
            if answer.strip().lower() in ("y", "yes"):
                run_cli(["rm", "--log", "-y", ids[0]])
                self.logs_ls([])

    def logs_back(self, args: list[str]) -> None:
        self.mode = "home"

    # --- completion ---------------------------------------------------------------------

    def words_for(self, before: list[str]) -> Iterable[str]:
        if not before:
            names = {u.split()[0] for u in HELP[self.mode] if u != "anything else"}
            names |= {"start", "stop", "pause", "resume", "cd", "pwd", "help", "man", "exit"} \
                if self.mode == "home" else {"help", "man", "exit"}
            return sorted(n for n in names if n.isidentifier())
        cmd = before[0]
        if cmd == "use":
            try:
                from git_tq.gpus import machine_gpus

                return [str(g) for g in machine_gpus(service.Context.open().config)] + ["any"]
            except TqError:
                return []
        if cmd == "plot" or cmd in ("view", "note", "catg", "rm", "p", "g", "t", "edit") \
                and len(before) == 1:
            return [str(n) for n in self.numbers]
        if cmd in ("hist", "lcd") or (cmd == "catg" and len(before) == 2):
            try:
                tree = service.log_tree(service.Context.open(), self.folder or None)
                return [f + "/" for f in tree.folders] + ([".."] if cmd == "lcd" else [])
            except TqError:
                return []
        return []


class ConsoleCompleter(Completer):
    def __init__(self, console: Console) -> None:
        self.console = console

    def get_completions(self, document: Document, complete_event: CompleteEvent
                        ) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        mid_word = bool(text) and not text[-1].isspace()
        current = words.pop() if mid_word and words else ""
        for word in self.console.words_for(words):
            if word.startswith(current):
                yield Completion(word, start_position=-len(current))


def run() -> None:
    """The console's read-eval loop."""
    console = Console()
    home = service.home_for()
    try:
        ensure_private_dir(home.path)
        path = os.path.join(home.path, "console_history")
        os.close(open_private(path))  # 0600, tightened if it exists (FileHistory appends)
        history: object = FileHistory(path)
    except OSError:
        history = InMemoryHistory()
    session: PromptSession[str] = PromptSession(history=history,  # type: ignore[arg-type]
                                                completer=ConsoleCompleter(console))
    console.ask = lambda text: session.prompt(text, completer=None)
    print("git tq console — `man` lists the commands, Ctrl-D leaves")
    while True:
        try:
            line = session.prompt(console.prompt())
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        try:
            if not console.handle(line):
                return
        except KeyboardInterrupt:
            continue
        except TqError as exc:
            print(visible(f"git tq: {exc}"))
        except Exception as exc:  # noqa: BLE001 - errors never leave the console
            print(visible(f"git tq: internal error: {type(exc).__name__}: {exc}"))
