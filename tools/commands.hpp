#pragma once
// Each subcommand lives in its own tools/cmd_*.cpp and registers itself on the app.
#include <CLI/CLI.hpp>

void add_train_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_predict_command(CLI::App& app);
void add_explain_command(CLI::App& app);
void add_graph_command(CLI::App& app);
void add_bench_command(CLI::App& app);
