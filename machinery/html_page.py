"""The HTML document around every page we write: valid HTML5, and inert even if something slipped through."""

from __future__ import annotations

import html

# Defence in depth: even if model text got past the escaping, the page may not run
# scripts or load anything remote.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

PAGE_STYLE = """
body { font: 16px/1.6 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
header p { color: #57606a; margin-top: 0; }
h1, h2, h3 { line-height: 1.25; }
table { border-collapse: collapse; } th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
code { background: #f6f8fa; padding: .1rem .3rem; }
"""


def html_page(title: str, body: str) -> str:
    """A complete HTML5 document around an already-safe body; the title is escaped here."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )
