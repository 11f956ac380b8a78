// dist/launch: who this process is in a data-parallel run, read from the
// environment the launchers users already have set (torch-free).
//
//   torchrun / torch.distributed.run   RANK, LOCAL_RANK, WORLD_SIZE,
//                                      LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//                                      (TORCHELASTIC_USE_AGENT_STORE: the agent
//                                      hosts the rendezvous store, every rank is
//                                      a client of it)
//   SLURM (srun)                       SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
//                                      SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE;
//                                      MASTER_ADDR defaults to the first host of
//                                      SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST),
//                                      MASTER_PORT to kDefaultMasterPort
//   neither                            one process: rank 0 of 1
// torchrun's variables win when both are present (torchrun inside an sbatch
// script). Inconsistent values (a rank outside the world, a non-number) are
// InputErrors naming the variable.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace qlora::dist {

constexpr int kDefaultMasterPort = 29500;

struct Launch {
  int64_t rank = 0;
  int64_t local_rank = 0;  // the GPU index on its host
  int64_t world_size = 1;
  int64_t local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = kDefaultMasterPort;
  bool agent_store = false;  // torchrun's agent serves the store: rank 0 connects as a client too
  std::string restart = "0";  // TORCHELASTIC_RESTART_COUNT: keeps store keys of restarts apart
  std::string source = "single process";  // "torchrun", "SLURM", "single process"

  bool distributed() const { return world_size > 1; }
  bool is_main() const { return rank == 0; }
  // "rank 1 of 4 (local rank 1 of 2 on this host), rendezvous at node01:29500, from torchrun"
  std::string describe() const;
};

// getenv-like lookup: the value, or nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;
EnvLookup process_env();

Launch launch_from_env(const EnvLookup& env = process_env());

// The first host of a SLURM node list: "node[03-05,07],gpu1" -> "node03",
// "a,b" -> "a", "host" -> "host".
std::string first_slurm_host(const std::string& nodelist);

}  // namespace qlora::dist
