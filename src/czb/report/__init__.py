"""Reports of result records: HTML, CSV, Markdown and terminal tables (``czb report``)."""
