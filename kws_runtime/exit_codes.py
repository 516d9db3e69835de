"""The exit statuses of the four commands: ``kws``, ``kws-data``, ``kws-train``, ``kws-export``."""

OK = 0
# The command ran, but some of its inputs or outputs failed: files that could not be
# classified, artifacts that could not be written. The rest was done.
SOME_FAILED = 1
# Nothing was done: bad arguments (argparse's own status), a bad bundle, checkpoint or data
# folder, an output folder that cannot be written, a missing extra.
CANNOT_RUN = 2
# Ctrl-C: 128 + SIGINT, as shells report it.
INTERRUPTED = 130
