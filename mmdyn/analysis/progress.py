# Copyright (c) mmdyn contributors. All rights reserved.
"""The logger mmdyn's tools report progress through.

The command-line tools (converters, ``get_flops.py``, ``benchmark.py``,
``vis_dynamic.py``) log their progress as mmdet's tools do: through an
mmengine :class:`~mmengine.logging.MMLogger`, with time stamps, to the
console (and to the log file of a run, when one is active). Results (the
tables, the ``--verify`` logits) are printed, not logged, so they can be
piped.
"""
import logging
import sys

from mmengine.logging import MMLogger

__all__ = ['TOOL_LOGGER', 'tool_logger']

#: Name of the tools' logger instance.
TOOL_LOGGER = 'mmdyn'


def tool_logger() -> MMLogger:
    """The tools' :class:`MMLogger` (created at level INFO on first use).

    Its console handler writes to the ``sys.stdout`` of the moment (a tool
    called in-process after ``sys.stdout`` was redirected logs there, not
    to the stream of the first call).
    """
    if MMLogger.check_instance_created(TOOL_LOGGER):
        logger = MMLogger.get_instance(TOOL_LOGGER)
    else:
        logger = MMLogger.get_instance(
            TOOL_LOGGER, logger_name=TOOL_LOGGER, log_level='INFO')
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and \
                handler.stream is not sys.stderr:
            # (not setStream: it flushes the old stream, which may be
            # closed by now)
            handler.acquire()
            try:
                handler.stream = sys.stdout
            finally:
                handler.release()
    return logger
