#include "qlora/train/plot.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"

namespace qlora::train {
namespace {

struct Point {
  double x, y;
};

// "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
std::vector<double> ticks(double lo, double hi, int target) {
  if (!(hi > lo)) hi = lo + 1;
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) {
      step = m * mag;
      break;
    }
  std::vector<double> out;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push_back(v);
  return out;
}

std::string num(double v) {
  char b[32];
  if (v != 0 && (std::fabs(v) < 1e-3 || std::fabs(v) >= 1e5)) std::snprintf(b, sizeof b, "%.0e", v);
  else std::snprintf(b, sizeof b, "%.4g", v);
  return b;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else o += c;
  }
  return o;
}

}  // namespace

std::string loss_plot_svg(const std::string& metrics_path, const std::string& title) {
  if (const std::string why = why_not_a_file(metrics_path); !why.empty())
    throw InputError(metrics_path + ": " + why + "; give a run's output directory (it holds metrics.jsonl)");
  std::vector<Point> train, eval, lr;
  std::ifstream in(metrics_path);
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a line cut short by a kill
    }
    if (!j.is_object() || !j.contains("step") || !j.contains("loss") || !j["loss"].is_number()) continue;
    const double step = j["step"].get<double>(), loss = j["loss"].get<double>();
    if (!std::isfinite(loss)) continue;
    if (j.value("type", "") == "train") {
      train.push_back({step, loss});
      if (j.contains("lr") && j["lr"].is_number()) lr.push_back({step, j["lr"].get<double>()});
    } else if (j.value("type", "") == "eval") {
      eval.push_back({step, loss});
    }
  }
  if (train.empty()) throw InputError(metrics_path + ": no training step in it; nothing to plot yet");

  const double W = 880, H = 480, left = 70, right = 70, top = 50, bottom = 55;
  const double pw = W - left - right, ph = H - top - bottom;
  double x0 = 0, x1 = train.back().x, y0 = 1e300, y1 = -1e300, lr1 = 0;
  for (const auto* v : {&train, &eval})
    for (const Point& p : *v) {
      x1 = std::max(x1, p.x);
      y0 = std::min(y0, p.y);
      y1 = std::max(y1, p.y);
    }
  for (const Point& p : lr) lr1 = std::max(lr1, p.y);
  const std::vector<double> xt = ticks(x0, std::max(x1, 1.0), 8), yt = ticks(std::max(0.0, y0 - 0.05 * (y1 - y0)), y1, 6);
  x1 = std::max(x1, xt.back());
  y0 = yt.front();
  y1 = std::max(y1, yt.back());
  const auto X = [&](double x) { return left + (x - x0) / (x1 - x0) * pw; };
  const auto Y = [&](double y) { return top + (1 - (y - y0) / (y1 - y0)) * ph; };
  const auto YL = [&](double v) { return top + (1 - v / (lr1 > 0 ? lr1 : 1)) * ph; };
  const auto poly = [](const std::vector<Point>& pts, const auto& fx, const auto& fy) {
    std::ostringstream o;
    for (const Point& p : pts) o << fx(p.x) << "," << fy(p.y) << " ";
    return o.str();
  };

  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << " " << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">" << escape(title) << "</text>\n";
  for (double v : yt)
    s << "<line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << Y(v) << "\" y2=\"" << Y(v)
      << "\" stroke=\"#e5e5e5\"/><text x=\"" << left - 8 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">" << num(v)
      << "</text>\n";
  for (double v : xt)
    s << "<line x1=\"" << X(v) << "\" x2=\"" << X(v) << "\" y1=\"" << top + ph << "\" y2=\"" << top + ph + 5
      << "\" stroke=\"#333\"/><text x=\"" << X(v) << "\" y=\"" << top + ph + 20 << "\" text-anchor=\"middle\">" << num(v)
      << "</text>\n";
  s << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"none\" stroke=\"#333\"/>\n"
    << "<text x=\"" << left + pw / 2 << "\" y=\"" << H - 12 << "\" text-anchor=\"middle\">optimizer step</text>\n"
    << "<text transform=\"translate(18," << top + ph / 2 << ") rotate(-90)\" text-anchor=\"middle\">loss</text>\n";
  if (!lr.empty() && lr1 > 0) {
    for (double v : ticks(0, lr1, 4))
      s << "<text x=\"" << left + pw + 8 << "\" y=\"" << YL(v) + 4 << "\" fill=\"#888\">" << num(v) << "</text>\n";
    s << "<text transform=\"translate(" << W - 14 << "," << top + ph / 2
      << ") rotate(90)\" text-anchor=\"middle\" fill=\"#888\">learning rate</text>\n"
      << "<polyline fill=\"none\" stroke=\"#999\" stroke-dasharray=\"5,4\" stroke-width=\"1.5\" points=\""
      << poly(lr, X, YL) << "\"/>\n";
  }
  s << "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"" << poly(train, X, Y) << "\"/>\n";
  if (!eval.empty()) {
    s << "<polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"2\" points=\"" << poly(eval, X, Y) << "\"/>\n";
    for (const Point& p : eval)
      s << "<circle cx=\"" << X(p.x) << "\" cy=\"" << Y(p.y) << "\" r=\"3.5\" fill=\"#ff7f0e\"/>\n";
  }
  const double lx = left + pw - 170, ly = top + 12;
  s << "<rect x=\"" << lx - 8 << "\" y=\"" << ly - 8 << "\" width=\"170\" height=\"" << (lr.empty() ? 44 : 62)
    << "\" fill=\"white\" stroke=\"#ccc\"/>\n"
    << "<line x1=\"" << lx << "\" x2=\"" << lx + 24 << "\" y1=\"" << ly + 4 << "\" y2=\"" << ly + 4
    << "\" stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"" << lx + 30 << "\" y=\"" << ly + 8 << "\">train loss</text>\n"
    << "<line x1=\"" << lx << "\" x2=\"" << lx + 24 << "\" y1=\"" << ly + 22 << "\" y2=\"" << ly + 22
    << "\" stroke=\"#ff7f0e\" stroke-width=\"2\"/><text x=\"" << lx + 30 << "\" y=\"" << ly + 26 << "\">held-out loss"
    << (eval.empty() ? " (none)" : "") << "</text>\n";
  if (!lr.empty())
    s << "<line x1=\"" << lx << "\" x2=\"" << lx + 24 << "\" y1=\"" << ly + 40 << "\" y2=\"" << ly + 40
      << "\" stroke=\"#999\" stroke-dasharray=\"5,4\"/><text x=\"" << lx + 30 << "\" y=\"" << ly + 44
      << "\">learning rate</text>\n";
  s << "</svg>\n";
  return s.str();
}

}  // namespace qlora::train
