// cli: the `qlora` command line (CLI11 subcommands). run() never throws: it
// maps InputError to exit 2, any other failure to exit 1, and prints one clear
// message on stderr.
#pragma once

namespace qlora::cli {

int run(int argc, char** argv);

}  // namespace qlora::cli
