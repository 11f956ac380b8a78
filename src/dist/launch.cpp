#include "qlora/dist/launch.h"

#include <cstdlib>
#include <string>

#include "qlora/common/errors.h"

namespace qlora::dist {
namespace {

int64_t int_var(const EnvLookup& env, const std::string& name, int64_t fallback, int64_t min_value) {
  const auto v = env(name);
  if (!v || v->empty()) return fallback;
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(*v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v->size() || x < min_value)
    throw InputError("environment variable " + name + "=\"" + *v + "\" is not an integer >= " +
                     std::to_string(min_value) + "; it is set by the launcher (torchrun, srun): unset it, or fix the launch");
  return x;
}

// SLURM_TASKS_PER_NODE looks like "4(x2),3": the first count is this layout's.
int64_t leading_count(const std::string& s, int64_t fallback) {
  size_t i = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
  return i == 0 ? fallback : std::stoll(s.substr(0, i));
}

}  // namespace

EnvLookup process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

std::string first_slurm_host(const std::string& nodelist) {
  // Hosts are separated by commas outside brackets; a bracket holds ranges.
  std::string first;
  int depth = 0;
  for (char c : nodelist) {
    if (c == ',' && depth == 0) break;
    if (c == '[') ++depth;
    if (c == ']') --depth;
    first += c;
  }
  const size_t open = first.find('[');
  if (open == std::string::npos) return first;
  // prefix[03-05,07]suffix -> prefix03suffix
  const size_t close = first.find(']', open);
  std::string inside = first.substr(open + 1, close == std::string::npos ? std::string::npos : close - open - 1);
  const size_t cut = inside.find_first_of(",-");
  if (cut != std::string::npos) inside = inside.substr(0, cut);
  return first.substr(0, open) + inside + (close == std::string::npos ? "" : first.substr(close + 1));
}

Launch launch_from_env(const EnvLookup& env) {
  Launch l;
  const auto has = [&](const char* n) {
    const auto v = env(n);
    return v && !v->empty();
  };
  if (has("WORLD_SIZE") || has("RANK")) {
    l.source = "torchrun";
    l.world_size = int_var(env, "WORLD_SIZE", 1, 1);
    l.rank = int_var(env, "RANK", 0, 0);
    l.local_rank = int_var(env, "LOCAL_RANK", l.rank, 0);
    l.local_world_size = int_var(env, "LOCAL_WORLD_SIZE", l.world_size, 1);
    l.agent_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    l.restart = env("TORCHELASTIC_RESTART_COUNT").value_or("0");
    if (l.world_size > 1 && !has("MASTER_ADDR"))
      throw InputError("WORLD_SIZE=" + std::to_string(l.world_size) +
                       " but MASTER_ADDR is not set: launch with torchrun (it sets both), or export MASTER_ADDR "
                       "and MASTER_PORT of rank 0's host");
  } else if (has("SLURM_PROCID") && int_var(env, "SLURM_NTASKS", 1, 1) > 1) {
    l.source = "SLURM";
    l.world_size = int_var(env, "SLURM_NTASKS", 1, 1);
    l.rank = int_var(env, "SLURM_PROCID", 0, 0);
    l.local_rank = int_var(env, "SLURM_LOCALID", 0, 0);
    l.local_world_size = has("SLURM_NTASKS_PER_NODE")
                             ? int_var(env, "SLURM_NTASKS_PER_NODE", 1, 1)
                             : leading_count(env("SLURM_TASKS_PER_NODE").value_or(""), l.world_size);
    if (!has("MASTER_ADDR")) {
      const std::string nodes = has("SLURM_STEP_NODELIST") ? *env("SLURM_STEP_NODELIST")
                                                           : env("SLURM_JOB_NODELIST").value_or("");
      if (nodes.empty())
        throw InputError("SLURM_NTASKS=" + std::to_string(l.world_size) +
                         " but neither MASTER_ADDR nor SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set; export "
                         "MASTER_ADDR=<first host of the job>");
      l.master_addr = first_slurm_host(nodes);
    }
  } else {
    return l;  // one process
  }
  if (has("MASTER_ADDR")) l.master_addr = *env("MASTER_ADDR");
  l.master_port = static_cast<int>(int_var(env, "MASTER_PORT", kDefaultMasterPort, 1));
  if (l.master_port > 65535)
    throw InputError("environment variable MASTER_PORT=" + std::to_string(l.master_port) + " is not a TCP port (1-65535)");
  const char* rank_var = l.source == "SLURM" ? "SLURM_PROCID" : "RANK";
  if (l.rank >= l.world_size)
    throw InputError(std::string("environment variable ") + rank_var + "=" + std::to_string(l.rank) +
                     " is outside the world of " + std::to_string(l.world_size) + " processes (ranks 0.." +
                     std::to_string(l.world_size - 1) + ")");
  return l;
}

std::string Launch::describe() const {
  if (!distributed()) return "one process";
  return "rank " + std::to_string(rank) + " of " + std::to_string(world_size) + " (local rank " +
         std::to_string(local_rank) + " of " + std::to_string(local_world_size) + " on this host), rendezvous at " +
         master_addr + ":" + std::to_string(master_port) + ", from " + source;
}

}  // namespace qlora::dist
