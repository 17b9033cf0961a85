"""Reports: pure plotting (figures.py, validate_figures.py), one HTML assembly and template for
every report (html.py, template.py), and the two pages: the rank report (build.py, rank_page.py)
and the validate report (validate_report.py, validate_tables.py), linked by links.py."""
