"""AS2 (RFC 4130) messages and MDN receipts (RFC 8098): building and parsing.

No network I/O: the channel carries what is built here.  Files are read and
written only for large messages, which are built and read on disk instead of
in memory (``message.build_message_file``, ``entity``), through fsutil.
"""
