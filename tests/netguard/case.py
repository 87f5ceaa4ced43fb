"""Run only by tests/test_netguard.py, in an inner pytest: each test reaches for the network, and the suite's
`offline` fixture must fail it. (Not named test_*.py, so the suite itself never collects it.)"""

import socket
import subprocess
import sys


def test_a_lookup_in_the_test_process():
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except socket.gaierror:
        pass  # refused, as offline; a library that falls back would carry on, and the test must still fail


def test_a_connection_from_a_process_the_test_starts():
    subprocess.run([sys.executable, "-c", "import socket; socket.socket().connect(('93.184.215.14', 443))"],
                   capture_output=True)
