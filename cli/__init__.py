"""refmtp's command line (click). Installed as ``refmtp.cli``; the commands stay thin and call
into ``refmtp``."""
