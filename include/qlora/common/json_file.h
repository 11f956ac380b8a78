// A JSON file that must hold one object (config.json, adapter_config.json), read with the
// messages every such loader shares. Torch-free.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace qlora {

// The object in the JSON file at `path`. InputError "<path>: <unreadable>" when the file cannot
// be opened, "<path>: not valid JSON (<why>)" and "<path>: expected a JSON object, got <type>"
// otherwise; a non-empty `expected` ("a Hugging Face config.json") is added to those two as
// "...; expected <expected>" and "expected a JSON object (<expected>), got ...".
nlohmann::json read_json_object(const std::string& path, const std::string& unreadable,
                                const std::string& expected = "");

}  // namespace qlora
