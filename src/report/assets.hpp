#pragma once
// The report page's stylesheet and script, inlined into every report (no network access).
namespace chaingrad::report::detail {

extern const char* const kStyle;
// Reads the JSON in <script id="report-data">, draws the charts into the <svg> placeholders and
// writes the number of points drawn into #plotted-points.
extern const char* const kScript;

}  // namespace chaingrad::report::detail
