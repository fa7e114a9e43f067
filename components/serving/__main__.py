"""``python -m components.serving``: what ``fod serve`` runs (and the pod's command)."""

from components.serving.server import main

main()
