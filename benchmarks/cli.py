"""What the command lines of the benchmarks share: list arguments and a help that shows defaults."""
import argparse

from .flops import MODES
from .providers import select_providers


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks; appends "(default: X)" where X says something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that answers a bad argument with one line, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def parser(prog, doc, epilog=None):
    """A Parser named as it is run (``python -m ...``), described by the module docstring's first line."""
    return Parser(prog=prog, description=doc.splitlines()[0], epilog=epilog, formatter_class=HelpFormatter)


def comma(values):
    return ",".join(map(str, values))


def int_list(text):
    """argparse type: "128,256" -> [128, 256], with a one-line error for anything else."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def name_list(text):
    """argparse type: "a,b" -> ["a", "b"]."""
    return [x for x in text.split(",") if x]


def check_providers_and_modes(p, args):
    """The --providers and --modes checks every benchmark command line makes, as one-line errors."""
    try:
        select_providers(args.providers)
    except ValueError as exc:
        p.error(f"--providers: {exc}")
    if isinstance(args.modes, str):  # the default, unparsed
        args.modes = name_list(args.modes)
    for mode in args.modes or []:  # None: the command's per-case defaults
        if mode not in MODES:
            p.error(f"--modes: {mode!r} is not one of {comma(MODES)}")
