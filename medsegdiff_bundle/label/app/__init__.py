"""The MONAI Label app folder (``monailabel start_server --app <this folder>``); its ``main.py`` needs MONAI Label."""
