// chaingrad: train | eval | predict | explain | graph | bench. Every error reaches the user as
// one line `error: ...` and a non-zero exit status, never as an exception trace.
#include <cstdio>
#include <exception>
#include <iostream>

#include "chaingrad/error.hpp"
#include "commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"chaingrad: train neural networks by backpropagation, and see the chain rule at work"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "chaingrad 0.1.0");
  add_train_command(app);
  add_eval_command(app);
  add_predict_command(app);
  add_explain_command(app);
  add_graph_command(app);
  add_bench_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "error: " << e.what() << " (see --help)\n";
    return e.get_exit_code() != 0 ? e.get_exit_code() : 1;
  } catch (const chaingrad::Error& e) {
    std::fflush(stdout);
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
