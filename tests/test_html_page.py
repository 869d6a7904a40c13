"""machinery/html_page.py: every page is a complete HTML5 document that may not run scripts or load anything."""

from __future__ import annotations

from machinery.html_page import CONTENT_SECURITY_POLICY, html_page


def test_a_page_is_a_complete_document():
    page = html_page("Title", "<main><p>Body</p></main>\n")
    assert page.startswith("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
    assert page.endswith("<body>\n<main><p>Body</p></main>\n</body>\n</html>\n")
    assert page.count("<title>") == 1 and "<title>Title</title>" in page
    assert '<meta name="viewport"' in page


def test_the_policy_forbids_scripts_and_remote_loads():
    page = html_page("T", "")
    assert f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">' in page
    directives = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'", "no script, frame, font, connection or remote image"
    assert "script-src" not in directives
    assert directives["img-src"] == "data:"


def test_the_title_is_escaped_and_the_body_is_not():
    page = html_page('<script>alert("x")</script> & co', "<p>trusted markup</p>")
    assert "<title>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co</title>" in page
    assert "<script>" not in page
    assert "<p>trusted markup</p>" in page
